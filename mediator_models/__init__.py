"""attnmed's models: DiT / SiT with full or mediator attention, their checkpoints, FLOPs, processes and samplers.

Nothing here imports `analysis`: measurements reach the models only as callables handed in by the caller.
"""

from mediator_models.network.attention import AttentionMaps, FullAttention, MediatorAttention
from mediator_models.network.config import ModelConfig, make_config, registry_names
from mediator_models.network.dit import DiffusionTransformer, build_model, model_from_config
from mediator_models.network.flops import config_gmacs, macs_breakdown, measured_macs, model_gmacs
from mediator_models.storage.checkpoints import CheckpointMismatchError, atomic_save, load_checkpoint

__all__ = [
    "AttentionMaps",
    "CheckpointMismatchError",
    "DiffusionTransformer",
    "FullAttention",
    "MediatorAttention",
    "ModelConfig",
    "atomic_save",
    "build_model",
    "config_gmacs",
    "load_checkpoint",
    "macs_breakdown",
    "make_config",
    "measured_macs",
    "model_from_config",
    "model_gmacs",
    "registry_names",
]
