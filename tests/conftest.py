"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_vae_path(tmp_path_factory):
    """A 25k-parameter AutoencoderKL with the SD VAE's 8× downsampling and 4 latent channels, saved locally."""
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def random_inception(tmp_path_factory):
    """torch-fidelity's InceptionV3 architecture with random weights, saved as a local weights file."""
    from torch_fidelity import feature_extractor_inceptionv3 as module

    folder = tmp_path_factory.mktemp("inception")
    empty = folder / "empty.pth"
    torch.save({}, empty)
    cls = module.FeatureExtractorInceptionV3
    original = cls.load_state_dict
    cls.load_state_dict = lambda self, state, *args, **kwargs: None  # build the architecture, keep its init
    try:
        torch.manual_seed(0)
        network = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    finally:
        cls.load_state_dict = original
    path = folder / "random-inception.pth"
    torch.save(network.state_dict(), path)
    return path
