"""Recording attention: the recorder (`recorder`), which hands each map to the caller's reducers beside the
fused output, so a recorded run is bit for bit the unrecorded one, and its processors for diffusers
transformers (`diffusers`).
"""
