"""What lasts on disk and what guards it: checkpoints (atomic, checksummed, key-checked loads of official,
public-mediator and diffusers weights), diffusers weights in and out, run folders (atomic writes, locks,
identities), the storage errors, and the distributed set-up with the folder lock every rank shares.

Builds on `mediator_models.network` only (diffusers weights convert onto its configs).
"""
