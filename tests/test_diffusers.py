"""diffusers' DiTTransformer2DModel ⇄ attnmed's DiT: equal outputs both ways (1e-5), with guidance, and the
numerics that differ between the two made explicit."""

from __future__ import annotations

import pytest
import torch

from mediator_models import build_model, load_checkpoint, make_config
from mediator_models.dit import DiffusionTransformer
from mediator_models.checkpoint import CheckpointMismatchError
from mediator_models.diffusers_dit import config_from_diffusers, save_diffusers
from mediator_models.sample import load_for_sampling


def tiny_diffusers_dit(seed: int = 0):
    """A randomly initialised 4-layer, 128-wide diffusers DiT whose per-block embedder copies agree, as in
    converted checkpoints (random init would give every block its own)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=8,
                                  num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=10)  # fmt: skip
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0, 0.05)  # no zero-initialised layer, so every path changes the output
        first = model.transformer_blocks[0].norm1.emb
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first.state_dict())
    return model.eval()


def inputs(batch: int = 3):
    torch.manual_seed(1)
    return torch.randn(batch, 4, 8, 8), torch.tensor([0.0, 417.0, 999.0])[:batch], torch.tensor([3, 7, 0])[:batch]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit") / "transformer"
    tiny_diffusers_dit().save_pretrained(str(folder))
    return folder


def test_a_diffusers_dit_loads_and_computes_exactly_as_diffusers_with_that_option(saved):
    theirs = tiny_diffusers_dit()
    x, t, y = inputs()
    loaded = load_for_sampling(saved, numerics="diffusers")
    assert loaded.model.config.name == "DiT-T/2" and loaded.process.family == "DiT"
    assert (loaded.model.config.timestep_freq_shift, loaded.model.config.mlp_norm_eps) == (1, 1e-5)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x, t, y), theirs(x, t, y).sample, atol=1e-5, rtol=1e-5)


def test_by_default_a_converted_dit_computes_as_the_original_dit(saved):
    theirs = tiny_diffusers_dit()
    x, t, y = inputs()
    as_dit = load_for_sampling(saved).model
    assert (as_dit.config.timestep_freq_shift, as_dit.config.mlp_norm_eps) == (0, 1e-6)
    reference = build_model("DiT-T/2", input_size=8, num_classes=10)
    load_checkpoint(reference, as_dit.state_dict())  # the same weights in a plain DiT
    with torch.no_grad():
        torch.testing.assert_close(as_dit(x, t, y), reference(x, t, y), atol=0, rtol=0)
        difference = (as_dit(x, t, y) - theirs(x, t, y).sample).abs().max()
    assert difference > 1e-4  # equal weights, other numerics: the option is not cosmetic


def test_our_dit_converts_to_diffusers_and_back_with_equal_outputs_and_guidance(tmp_path):
    from diffusers import DiTTransformer2DModel

    config = make_config("DiT-T/2", input_size=8, num_classes=10).replace(timestep_freq_shift=1, mlp_norm_eps=1e-5)
    model = DiffusionTransformer(config)  # computes as diffusers does
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.05)
    model.eval()
    save_diffusers(model, tmp_path / "out")
    theirs = DiTTransformer2DModel.from_pretrained(str(tmp_path / "out")).eval()
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, t, y).sample, model(x, t, y), atol=1e-5, rtol=1e-5)
        # Classifier-free guidance on all latent channels, as DiTPipeline applies it.
        doubled = (torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]))
        ours = model.forward_with_cfg(*doubled, cfg_scale=4.0)[: len(x)]
        out = theirs(*doubled).sample
        eps, rest = out[:, :4], out[:, 4:]
        cond, uncond = eps.chunk(2)
        guided = torch.cat([uncond + 4.0 * (cond - uncond), rest[: len(x)]], dim=1)
        torch.testing.assert_close(ours, guided, atol=1e-5, rtol=1e-5)
    back = load_for_sampling(tmp_path / "out", numerics="diffusers").model
    for key, value in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, atol=0, rtol=0)


def test_embedder_copies_that_disagree_are_refused(tmp_path):
    model = tiny_diffusers_dit()
    with torch.no_grad():
        model.transformer_blocks[2].norm1.emb.timestep_embedder.linear_1.weight.add_(0.1)
    state = model.state_dict()
    with pytest.raises(CheckpointMismatchError, match="block 2's copy of timestep_embedder.linear_1.weight differs"):
        load_checkpoint(build_model("DiT-T/2", input_size=8, num_classes=10), state)


def test_a_diffusers_state_dict_loads_into_a_matching_dit_and_a_mismatch_is_named():
    state = tiny_diffusers_dit().state_dict()
    config = config_from_diffusers({"num_attention_heads": 4, "attention_head_dim": 32, "in_channels": 4,
                                    "out_channels": 8, "num_layers": 4, "sample_size": 8, "patch_size": 2,
                                    "num_embeds_ada_norm": 10}, state)  # fmt: skip
    assert config.name == "DiT-T/2" and config.learn_sigma and config.class_dropout_prob == 0.1
    load_checkpoint(build_model("DiT-T/2", input_size=8, num_classes=10), state)
    with pytest.raises(CheckpointMismatchError, match="patch_size"):
        load_checkpoint(build_model("DiT-T/4", input_size=8, num_classes=10), state)


def test_sample_command_takes_a_diffusers_folder(tmp_path, saved):
    import json

    from analysis.cli import main

    out = tmp_path / "samples"
    assert main(["sample", "--ckpt", str(saved.parent), "--numerics", "diffusers", "--steps", "3",
                 "--num-samples", "2", "--out", str(out)]) == 0  # fmt: skip
    sidecar = json.loads((out / "samples.json").read_text())
    assert sidecar["model"]["timestep_freq_shift"] == 1 and sidecar["sampler"]["kind"] == "ddpm"
