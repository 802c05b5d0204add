"""The networks: configs and their registry of names, layers, attention (full, mediator, conv-only), the DiT/SiT
transformer and its FLOPs. Parameter names match the public DiT and mediator checkpoints, so those load strictly.

Imports nothing else of attnmed: every other part builds on this one.
"""
