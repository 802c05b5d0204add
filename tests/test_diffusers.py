"""diffusers' DiTTransformer2DModel ⇄ attnmed's DiT: equal outputs both ways (1e-5), with guidance, and the
numerics that differ between the two made explicit."""

from __future__ import annotations

import pytest
import torch

from mediator_models import build_model, load_checkpoint, make_config
from mediator_models.network.dit import DiffusionTransformer
from mediator_models.sample import load_for_sampling
from mediator_models.storage.checkpoints import CheckpointMismatchError
from mediator_models.storage.diffusers_weights import config_from_diffusers, save_diffusers


def tiny_diffusers_dit(seed: int = 0):
    """A randomly initialised 4-layer, 128-wide diffusers DiT whose per-block embedder copies agree, as in
    converted checkpoints (random init would give every block its own)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=4,
        out_channels=8,
        num_layers=4,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    )
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
    config = config_from_diffusers(
        {
            "num_attention_heads": 4,
            "attention_head_dim": 32,
            "in_channels": 4,
            "out_channels": 8,
            "num_layers": 4,
            "sample_size": 8,
            "patch_size": 2,
            "num_embeds_ada_norm": 10,
        },
        state,
    )
    assert config.name == "DiT-T/2" and config.learn_sigma and config.class_dropout_prob == 0.1
    load_checkpoint(build_model("DiT-T/2", input_size=8, num_classes=10), state)
    with pytest.raises(CheckpointMismatchError, match="patch_size"):
        load_checkpoint(build_model("DiT-T/4", input_size=8, num_classes=10), state)


def test_sample_command_takes_a_diffusers_folder(tmp_path, saved, tiny_vae_path):
    import json

    from analysis.cli import main

    out = tmp_path / "samples"
    assert (
        main(
            [
                "sample",
                "--ckpt",
                str(saved.parent),
                "--vae",  # a bare transformer folder brings no VAE: its 4-channel latents need one
                str(tiny_vae_path),
                "--numerics",
                "diffusers",
                "--steps",
                "3",
                "--num-samples",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    sidecar = json.loads((out / "samples.json").read_text())
    assert sidecar["model"]["timestep_freq_shift"] == 1 and sidecar["sampler"]["kind"] == "ddpm"


# ---- the recorder on diffusers transformers ---------------------------------------------------------------


def randomised(model, seed: int = 0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.05)
    return model.eval()


def pixart():
    from diffusers import PixArtTransformer2DModel

    return randomised(
        PixArtTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            sample_size=8,
            patch_size=2,
            cross_attention_dim=32,
            caption_channels=24,
            norm_num_groups=1,
        )
    )


def sd3():
    from diffusers import SD3Transformer2DModel

    return randomised(
        SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=24,
            caption_projection_dim=32,
            pooled_projection_dim=12,
            out_channels=4,
            pos_embed_max_size=8,
        )
    )


def call(model, x, t):
    """One forward of each kind of transformer with made-up conditioning."""
    torch.manual_seed(5)
    name = type(model).__name__
    if name.startswith("PixArt"):
        text = torch.randn(len(x), 7, 24)
        return model(
            x, encoder_hidden_states=text, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}
        ).sample
    if name.startswith("SD3"):
        return model(
            x, encoder_hidden_states=torch.randn(len(x), 7, 24), pooled_projections=torch.randn(len(x), 12), timestep=t
        ).sample
    return model(x, timestep=t, class_labels=torch.tensor([3, 7, 0])[: len(x)]).sample


@pytest.mark.parametrize("make", [tiny_diffusers_dit, pixart, sd3], ids=["DiT", "PixArt", "SD3"])
def test_recording_a_diffusers_transformer_leaves_its_output_bit_for_bit_and_records_every_layer(make):
    from analysis.metrics import metric_reducer
    from mediator_models.recording.recorder import record_attention
    from mediator_models.sampling.steps import StepInfo

    model = make()
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10.0, 500.0, 900.0])
    with torch.no_grad():
        plain = call(model, x, t)
        with record_attention({"m": model}, metric_reducer(("jsd", "entropy"))) as recorder:
            recorder.callback(StepInfo(0, t, 0.5, x))
            recorded = call(model, x, t)
    torch.testing.assert_close(recorded, plain, atol=0, rtol=0)
    rows = recorder.rows()
    layers = {4 if make is tiny_diffusers_dit else 2}
    assert {len({r["layer"] for r in rows})} == layers and {r["count"] for r in rows} == {3}
    assert all(0 <= r["mean"] <= 1 for r in rows if r["metric"] == "entropy")
    processors = {type(m.processor).__name__ for m in model.modules() if hasattr(m, "processor")}
    assert "RecordingProcessor" not in processors  # detached: the layers' own processors again


def test_recorded_maps_of_a_diffusers_dit_equal_those_of_the_same_weights_in_attnmed(saved):
    from analysis.metrics import metric_reducer
    from mediator_models.recording.recorder import record_attention
    from mediator_models.sampling.steps import StepInfo

    theirs = tiny_diffusers_dit()
    ours = load_for_sampling(saved, numerics="diffusers").model
    x, t, y = inputs()
    tables = []
    for model in (theirs, ours):
        with torch.no_grad(), record_attention({"m": model}, metric_reducer(("jsd", "entropy", "cosine"))) as recorder:
            recorder.callback(StepInfo(0, t, 0.5, x))
            model(x, timestep=t, class_labels=y) if model is theirs else model(x, t, y)
        tables.append({(r["layer"], r["head"], r["metric"]): r["mean"] for r in recorder.rows()})
    assert tables[0].keys() == tables[1].keys()
    for key, value in tables[0].items():
        assert value == pytest.approx(tables[1][key], rel=1e-5, abs=1e-6), key


@pytest.fixture(scope="module")
def dit_pipeline_folder(tmp_path_factory, tiny_vae_path):
    """A tiny DiTPipeline saved locally: a 1000-class DiT-T/2 on 8×8 latents, the tiny VAE, DDIM."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = randomised(
        DiTTransformer2DModel(
            num_attention_heads=4,
            attention_head_dim=32,
            in_channels=4,
            out_channels=8,
            num_layers=4,
            sample_size=4,
            patch_size=2,
            num_embeds_ada_norm=1000,
        )
    )
    first = transformer.transformer_blocks[0].norm1.emb
    for block in transformer.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first.state_dict())
    pipeline = DiTPipeline(
        transformer=transformer, vae=AutoencoderKL.from_pretrained(str(tiny_vae_path)), scheduler=DDIMScheduler()
    )
    folder = tmp_path_factory.mktemp("pipeline") / "dit"
    pipeline.save_pretrained(str(folder))
    return folder


def test_record_command_runs_a_diffusers_pipeline_and_leaves_its_images_unchanged(tmp_path, dit_pipeline_folder):
    import pandas as pd
    from diffusers import DiffusionPipeline

    from analysis.cli import main
    from analysis.collect import CollectionConfig, collect_redundancy_diffusers

    pipeline = DiffusionPipeline.from_pretrained(str(dit_pipeline_folder), local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    plain = pipeline(
        class_labels=[1, 2],
        num_inference_steps=4,
        guidance_scale=1.5,
        generator=[torch.Generator().manual_seed(i) for i in (0, 1)],
        output_type="pt",
    ).images
    table = collect_redundancy_diffusers(
        pipeline, CollectionConfig(samples=2, batch_size=2, classes=(1, 2)), steps=4, guidance_scale=1.5, progress=False
    )
    recorded = pipeline(
        class_labels=[1, 2],
        num_inference_steps=4,
        guidance_scale=1.5,
        generator=[torch.Generator().manual_seed(i) for i in (0, 1)],
        output_type="pt",
    ).images
    torch.testing.assert_close(recorded, plain, atol=0, rtol=0)  # and the recorder is detached afterwards
    assert set(table["branch"]) == {"cond", "uncond"} and set(table["step"]) == {0, 1, 2, 3}
    levels = table.groupby("step")["noise_level"].first().tolist()
    assert all(a > b for a, b in zip(levels, levels[1:])) and 0 < levels[-1] < levels[0] <= 1
    out = tmp_path / "table.parquet"
    assert (
        main(
            [
                "record",
                "--diffusers",
                str(dit_pipeline_folder),
                "--steps",
                "4",
                "--samples",
                "2",
                "--cfg-scale",
                "1.5",
                "--classes",
                "1",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    written = pd.read_parquet(out)
    assert len(written) == len(table)
    torch.testing.assert_close(torch.tensor(written["mean"].values), torch.tensor(table["mean"].values))
    assert main(["plot", str(out), "--out", str(tmp_path / "figures")]) == 0


def test_a_pipeline_records_the_same_table_with_the_diffusers_dit_or_its_weights_in_attnmed(dit_pipeline_folder):
    """Same sampler (the pipeline's DDIM loop), same noise, same weights: the diffusers transformer and the
    converted attnmed DiT (numerics "diffusers") give the same redundancy table."""
    from diffusers import DiffusionPipeline, DiTPipeline

    from analysis.collect import CollectionConfig, collect_redundancy_diffusers
    from mediator_models.storage.diffusers_weights import AsDiffusersTransformer

    pipeline = DiffusionPipeline.from_pretrained(str(dit_pipeline_folder), local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    ours = load_for_sampling(dit_pipeline_folder, numerics="diffusers").model
    twin = DiTPipeline(transformer=AsDiffusersTransformer(ours), vae=pipeline.vae, scheduler=pipeline.scheduler)
    twin.set_progress_bar_config(disable=True)
    # Beside the one-map measures, those that read the layer's values (across steps, across guidance branches) and
    # its queries and keys (the premise's pooled mediators): the processors hand them over as attnmed's layers do.
    metrics = ("jsd", "entropy", "cosine", "step_output_rel_l1", "branch_output_cosine", "recovery_pooled_4")
    collection = CollectionConfig(samples=2, batch_size=2, metrics=metrics, classes=(4, 9))
    tables = [
        collect_redundancy_diffusers(p, collection, steps=4, guidance_scale=1.5, progress=False)
        for p in (pipeline, twin)
    ]
    assert set(tables[0]["metric"]) == set(metrics)
    keys = ["step", "layer", "head", "branch", "metric"]
    merged = tables[0].merge(tables[1], on=keys, suffixes=("_diffusers", "_attnmed"))
    assert len(merged) == len(tables[0]) == len(tables[1])
    torch.testing.assert_close(
        torch.tensor(merged["mean_attnmed"].values), torch.tensor(merged["mean_diffusers"].values), atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(
        torch.tensor(merged["noise_level_attnmed"].values), torch.tensor(merged["noise_level_diffusers"].values)
    )


# ---- Flux, and PixArt / SD3 / Flux pipelines -------------------------------------------------------------------


def flux():
    from diffusers import FluxTransformer2DModel

    return randomised(
        FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=24,
            pooled_projection_dim=12,
            axes_dims_rope=(4, 6, 6),
        ),
        seed=1,
    )


def flux_inputs(batch: int = 2, image: int = 16, text: int = 5):
    torch.manual_seed(3)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(image / 4), indexing="ij"), -1)
    return {
        "hidden_states": torch.randn(batch, image, 16),
        "encoder_hidden_states": torch.randn(batch, text, 24),
        "pooled_projections": torch.randn(batch, 12),
        "timestep": torch.tensor([0.9, 0.3][:batch]),
        "img_ids": img_ids.reshape(-1, 3),
        "txt_ids": torch.zeros(text, 3),
    }


def test_flux_layers_are_recorded_with_their_rotary_embedding_and_outputs_stay_bit_for_bit(monkeypatch):
    """The maps equal the image→image block of the joint softmax diffusers itself computes, captured by swapping
    its attention kernel for an explicit one, in the double-stream (text first) and single-stream blocks."""
    import diffusers.models.transformers.transformer_flux as flux_module

    from mediator_models.recording.recorder import record_attention
    from mediator_models.sampling.steps import StepInfo

    model, inputs = flux(), flux_inputs()
    with torch.no_grad():
        plain = model(**inputs).sample
        seen = []
        with record_attention({"flux": model}, lambda maps: seen.append(maps.full) or {}) as recorder:
            recorder.callback(StepInfo(0, inputs["timestep"], 0.5, inputs["hidden_states"]))
            recorded = model(**inputs).sample
        torch.testing.assert_close(recorded, plain, atol=0, rtol=0)
        captured = []

        def explicit(query, key, value, attn_mask=None, **_):  # (B, N, heads, d), as diffusers passes them
            q, k, v = (t.transpose(1, 2) for t in (query, key, value))
            weights = ((q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5).softmax(-1)
            captured.append(weights)
            return (weights @ v).transpose(1, 2)

        monkeypatch.setattr(flux_module, "dispatch_attention_fn", explicit)
        torch.testing.assert_close(model(**inputs).sample, plain, atol=1e-5, rtol=1e-5)  # the kernel swap is faithful
    assert len(seen) == len(captured) == 2  # one double-stream, one single-stream block
    text = inputs["encoder_hidden_states"].shape[1]
    for ours, theirs in zip(seen, captured):
        block = theirs[..., text:, text:]
        torch.testing.assert_close(ours, block / block.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)
        assert ours.shape == (2, 2, 16, 16)


def tiny_text_pipeline(kind: str, vae_path):
    """A PixArt-α, SD3 or Flux pipeline with a tiny random transformer and no text encoders: it is driven by
    precomputed prompt embeddings, so nothing needs downloading. Returns (pipeline, embeddings, call options,
    what a direct call needs beside the embeddings)."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        PixArtAlphaPipeline,
        StableDiffusion3Pipeline,
    )

    vae = AutoencoderKL.from_pretrained(str(vae_path))
    torch.manual_seed(4)
    if kind == "PixArt":
        pipeline = PixArtAlphaPipeline(
            tokenizer=None, text_encoder=None, vae=vae, transformer=pixart(), scheduler=DPMSolverMultistepScheduler()
        )
        embeddings = {
            "prompt_embeds": torch.randn(1, 7, 24),
            "prompt_attention_mask": torch.ones(1, 7, dtype=torch.long),
            "negative_prompt_embeds": torch.randn(1, 7, 24),
            "negative_prompt_attention_mask": torch.ones(1, 7, dtype=torch.long),
        }
        return (
            pipeline,
            embeddings,
            {"height": 64, "width": 64, "use_resolution_binning": False},
            {"negative_prompt": None},
        )
    if kind == "SD3":
        pipeline = StableDiffusion3Pipeline(
            transformer=sd3(),
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            text_encoder_3=None,
            tokenizer_3=None,
        )
        embeddings = {
            "prompt_embeds": torch.randn(1, 7, 24),
            "pooled_prompt_embeds": torch.randn(1, 12),
            "negative_prompt_embeds": torch.randn(1, 7, 24),
            "negative_pooled_prompt_embeds": torch.randn(1, 12),
        }
        return pipeline, embeddings, {"height": 64, "width": 64}, {}
    pipeline = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=flux(),
    )
    embeddings = {"prompt_embeds": torch.randn(1, 5, 24), "pooled_prompt_embeds": torch.randn(1, 12)}
    return pipeline, embeddings, {"height": 64, "width": 64}, {}


@pytest.mark.parametrize("kind", ["PixArt", "SD3", "Flux"])
def test_recording_a_text_pipeline_leaves_its_images_unchanged_and_tables_every_step(kind, tiny_vae_path):
    from analysis.collect import CollectionConfig, collect_redundancy_diffusers

    pipeline, embeddings, options, direct = tiny_text_pipeline(kind, tiny_vae_path)
    pipeline.set_progress_bar_config(disable=True)
    guidance = 1.0 if kind == "Flux" else 2.0  # Flux guides through an embedding: its batch is never doubled

    def images():
        batch = {k: v.repeat(2, *[1] * (v.ndim - 1)) for k, v in embeddings.items()}
        return pipeline(
            **batch,
            num_inference_steps=3,
            guidance_scale=guidance,
            output_type="latent",
            generator=[torch.Generator().manual_seed(i) for i in (0, 1)],
            **options,
            **direct,
        ).images

    plain = images()
    table = collect_redundancy_diffusers(
        pipeline,
        CollectionConfig(samples=2, batch_size=2),
        steps=3,
        guidance_scale=guidance,
        embeddings=embeddings,
        progress=False,
        **options,
    )
    torch.testing.assert_close(images(), plain, atol=0, rtol=0)  # recorded and detached: the same images
    assert set(table["step"]) == {0, 1, 2} and set(table["layer"]) == {0, 1}
    assert set(table["branch"]) == ({"all"} if kind == "Flux" else {"cond", "uncond"})
    levels = table.groupby("step")["noise_level"].first().tolist()
    assert all(a > b for a, b in zip(levels, levels[1:])) and 0 < levels[-1] and levels[0] <= 1
    jsd = table[(table["metric"] == "jsd") & (table["head"] == -1)]["mean"]
    assert ((jsd >= 0) & (jsd <= 1)).all() and (table["count"] == 2).all()
    with pytest.raises(ValueError, match="conditioned on text"):
        collect_redundancy_diffusers(pipeline, CollectionConfig(samples=1), steps=1, progress=False)


def test_record_command_drives_a_saved_text_pipeline_with_precomputed_embeddings(tmp_path, tiny_vae_path, capsys):
    import pandas as pd

    from analysis.cli import main
    from analysis.collect import CollectionConfig, collect_redundancy_diffusers

    pipeline, embeddings, options, _ = tiny_text_pipeline("SD3", tiny_vae_path)
    folder = tmp_path / "sd3"
    pipeline.save_pretrained(str(folder))  # the text encoders are absent: the embeddings stand in for them
    torch.save(embeddings, tmp_path / "embeddings.pt")
    out = tmp_path / "sd3.parquet"
    assert (
        main(
            [
                "record",
                "--diffusers",
                str(folder),
                "--embeddings",
                str(tmp_path / "embeddings.pt"),
                "--size",
                "64",
                "--steps",
                "3",
                "--samples",
                "2",
                "--cfg-scale",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    pipeline.set_progress_bar_config(disable=True)
    direct = collect_redundancy_diffusers(
        pipeline,
        CollectionConfig(samples=2, batch_size=8),
        steps=3,
        guidance_scale=2.0,
        embeddings=embeddings,
        progress=False,
        **options,
    )
    written = pd.read_parquet(out)
    torch.testing.assert_close(torch.tensor(written["mean"].values), torch.tensor(direct["mean"].values))
    torch.save({"prompt_embeds": torch.randn(2, 7, 24)}, tmp_path / "two.pt")
    assert (
        main(["record", "--diffusers", str(folder), "--embeddings", str(tmp_path / "two.pt"), "--out", str(out)]) == 2
    )
    assert "must hold {name: tensor of batch 1}" in capsys.readouterr().err


def test_record_command_encodes_prompts_with_the_pipelines_own_text_encoder(tmp_path, tiny_vae_path):
    """A PixArt folder with a tiny T5 encoder and a word-level tokenizer made here: `--prompt` goes through them."""
    import pandas as pd
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    from analysis.cli import main

    words = ["<pad>", "</s>", "<unk>", "a", "red", "fox", "in", "snow"]
    vocabulary = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    vocabulary.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=vocabulary, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    encoder = T5EncoderModel(T5Config(vocab_size=len(words), d_model=24, d_ff=32, num_layers=1, num_heads=2, d_kv=12))
    pipeline = PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=encoder,
        transformer=pixart(),
        vae=AutoencoderKL.from_pretrained(str(tiny_vae_path)),
        scheduler=DPMSolverMultistepScheduler(),
    )
    folder = tmp_path / "pixart"
    pipeline.save_pretrained(str(folder))
    out = tmp_path / "pixart.parquet"
    assert (
        main(
            [
                "record",
                "--diffusers",
                str(folder),
                "--prompt",
                "a red fox",
                "snow",
                "--size",
                "64",
                "--steps",
                "2",
                "--samples",
                "2",
                "--cfg-scale",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    table = pd.read_parquet(out)
    assert set(table["branch"]) == {"cond", "uncond"} and set(table["step"]) == {0, 1} and set(table["layer"]) == {0, 1}


def test_keep_maps_with_a_diffusers_pipeline_is_refused_not_ignored(tmp_path, capsys):
    from analysis.cli import main

    args = ["record", "--diffusers", str(tmp_path), "--keep-maps", "0:0", "--out", str(tmp_path / "t.parquet")]
    assert main(args) == 2
    assert "drop --keep-maps" in capsys.readouterr().err and not (tmp_path / "t.parquet").exists()


# ---- what the recorder refuses, and pipelines it cannot read -----------------------------------------------


class OneLayer(torch.nn.Module):
    """The smallest model the recorder recognises: one diffusers self-attention layer named `attn1`."""

    def __init__(self, **options):
        from diffusers.models.attention_processor import Attention

        super().__init__()
        self.attn1 = Attention(32, heads=2, dim_head=16, **options)
        randomised(self)


def recorded_maps(model, x, **call):
    from mediator_models.recording.diffusers import attach

    seen = []
    detach = attach(model, lambda layer: lambda maps: seen.append(maps.full))
    try:
        with torch.no_grad():
            output = model.attn1(x, **call)
    finally:
        detach()
    return seen, output


def diffusers_probabilities(attn, x, norms: bool) -> torch.Tensor:
    """The attention probabilities diffusers itself computes (Attention.get_attention_scores, with attn.scale)."""
    with torch.no_grad():
        query, key = attn.head_to_batch_dim(attn.to_q(x)), attn.head_to_batch_dim(attn.to_k(x))
        if norms and attn.norm_q is not None:  # AttnProcessor2_0 normalises per head; AttnProcessor does not
            query, key = attn.norm_q(query), attn.norm_k(key)
        return attn.get_attention_scores(query, key).view(len(x), attn.heads, x.shape[1], x.shape[1])


@pytest.mark.parametrize(
    "options",
    [{"scale_qk": False}, {"scale_qk": False, "qk_norm": "layer_norm"}, {}, {"qk_norm": "layer_norm"}],
    ids=["unscaled", "unscaled-with-qk-norm", "scaled", "scaled-with-qk-norm"],
)
def test_recorded_maps_equal_diffusers_own_attention_probabilities_with_the_layers_scale(options):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    model = OneLayer(**options)
    attn = model.attn1
    assert type(attn.processor) is (AttnProcessor2_0 if attn.scale_qk else AttnProcessor)  # as diffusers picks
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        plain = attn(x)
    seen, recorded = recorded_maps(model, x)
    torch.testing.assert_close(recorded, plain, atol=0, rtol=0)
    expected = diffusers_probabilities(attn, x, norms=attn.scale_qk)
    assert len(seen) == 1 and seen[0].shape == (2, 2, 10, 10)
    torch.testing.assert_close(seen[0], expected, atol=1e-5, rtol=1e-5)


class Unrecognised:
    """A custom processor: its own computation, which the recorder cannot know."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        return hidden_states


@pytest.mark.parametrize(
    "options, refusal",
    [
        ({"norm_num_groups": 4}, r"attn1 has a group_norm \(norm_num_groups=4\)"),
        ({"spatial_norm_dim": 8}, r"attn1 has a spatial_norm \(spatial_norm_dim\)"),
        ({"processor": Unrecognised()}, r"attn1 uses Unrecognised, which the recorder does not reproduce"),
    ],
    ids=["group-norm", "spatial-norm", "other-processor"],
)
def test_a_layer_whose_maps_the_recorder_cannot_reproduce_is_refused_naming_layer_and_setting(options, refusal):
    from mediator_models.recording.diffusers import attach

    model = OneLayer(**options)
    with pytest.raises(ValueError, match=refusal):
        attach(model, lambda layer: lambda maps: None)
    assert type(model.attn1.processor).__name__ != "RecordingProcessor"


def test_call_time_inputs_the_maps_would_not_reproduce_are_refused_before_the_layer_runs():
    model = OneLayer()
    x = torch.randn(2, 10, 32)
    with pytest.raises(ValueError, match="attn1 was called with an attention_mask"):
        recorded_maps(model, x, attention_mask=torch.zeros(2, 1, 10))
    with pytest.raises(ValueError, match="attn1 was called with encoder_hidden_states"):
        recorded_maps(model, x, encoder_hidden_states=torch.randn(2, 4, 32))
    seen, _ = recorded_maps(model, x, attention_mask=None)  # no mask: recorded as before
    assert len(seen) == 1


@pytest.fixture(scope="module")
def ddpm_pipeline_folder(tmp_path_factory):
    """A tiny DDPMPipeline (a UNet, no transformer) saved locally."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    folder = tmp_path_factory.mktemp("pipeline") / "ddpm"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("prompt", [[], ["--prompt", "a fox"]], ids=["no-prompt", "prompt"])
def test_recording_a_pipeline_without_a_transformer_is_refused_up_front(tmp_path, ddpm_pipeline_folder, prompt, capsys):
    from analysis.cli import main

    out = tmp_path / "t.parquet"
    assert main(["record", "--diffusers", str(ddpm_pipeline_folder), *prompt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{ddpm_pipeline_folder} holds a DDPMPipeline, which has no transformer" in err
    assert "DiTPipeline" in err and "conditioned on text" not in err and not out.exists()


def test_collecting_from_a_pipeline_without_a_transformer_is_refused(ddpm_pipeline_folder):
    from diffusers import DiffusionPipeline

    from analysis.collect import CollectionConfig, collect_redundancy_diffusers

    pipeline = DiffusionPipeline.from_pretrained(str(ddpm_pipeline_folder), local_files_only=True)
    with pytest.raises(ValueError, match="a DDPMPipeline has no transformer"):
        collect_redundancy_diffusers(pipeline, CollectionConfig(samples=1), steps=1, prompts=["a fox"], progress=False)


def test_sampling_a_pipeline_folder_without_a_transformer_names_its_class(tmp_path, ddpm_pipeline_folder, capsys):
    from analysis.cli import main

    args = ["sample", "--ckpt", str(ddpm_pipeline_folder), "--steps", "1", "--num-samples", "1"]
    assert main([*args, "--out", str(tmp_path / "samples")]) == 2
    err = capsys.readouterr().err
    assert "is a diffusers DDPMPipeline folder (scheduler, unet), which has no transformer" in err
    assert "not a diffusers model folder" not in err


def test_a_vae_folder_holding_another_model_is_refused_naming_its_class(tmp_path, ddpm_pipeline_folder, capsys):
    from PIL import Image

    from analysis.cli import main
    from mediator_models.data import load_vae
    from mediator_models.storage.errors import SettingError

    unet = ddpm_pipeline_folder / "unet"
    with pytest.raises(SettingError, match="holds a UNet2DModel .*not a VAE: pass an AutoencoderKL folder") as error:
        load_vae(str(unet))
    assert error.value.setting == "vae" and "pass its vae/ folder" in error.value.reason
    (tmp_path / "images" / "a").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "a" / "0.png")
    args = ["cache-latents", "--data", str(tmp_path / "images"), "--image-size", "32", "--vae", str(unet)]
    assert main([*args, "--no-progress", "--out", str(tmp_path / "latents")]) == 2
    assert f"--vae {unet} holds a UNet2DModel" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, refusal",
    [
        (["--size", "32"], "--size 32: a DiTPipeline takes no image size; it samples at its transformer's sample_size"),
        (["--prompt", "x"], "--prompt is for text pipelines; {folder} holds a DiTPipeline, which is class-conditional"),
    ],
    ids=["size", "prompt"],
)
def test_text_pipeline_flags_given_for_a_class_conditional_dit_pipeline_are_refused(
    tmp_path, dit_pipeline_folder, flags, refusal, capsys
):
    from analysis.cli import main

    out = tmp_path / "t.parquet"
    assert main(["record", "--diffusers", str(dit_pipeline_folder), *flags, "--steps", "1", "--out", str(out)]) == 2
    assert refusal.format(folder=dit_pipeline_folder) in capsys.readouterr().err and not out.exists()


def test_collecting_from_a_dit_pipeline_refuses_prompts_and_options_it_does_not_take(dit_pipeline_folder):
    from diffusers import DiffusionPipeline

    from analysis.collect import CollectionConfig, collect_redundancy_diffusers

    pipeline = DiffusionPipeline.from_pretrained(str(dit_pipeline_folder), local_files_only=True)
    collection = CollectionConfig(samples=1)
    with pytest.raises(ValueError, match="DiT is class-conditional"):
        collect_redundancy_diffusers(pipeline, collection, steps=1, prompts=["x"], progress=False)
    with pytest.raises(ValueError, match="DiTPipeline takes no height, width"):
        collect_redundancy_diffusers(pipeline, collection, steps=1, height=32, width=32, progress=False)


def test_a_text_pipeline_refuses_class_labels_and_its_table_is_never_replaced_by_another(
    tmp_path, tiny_vae_path, capsys
):
    from analysis.cli import main

    pipeline, embeddings, _, _ = tiny_text_pipeline("SD3", tiny_vae_path)
    folder = tmp_path / "sd3"
    pipeline.save_pretrained(str(folder))
    torch.save(embeddings, tmp_path / "embeddings.pt")
    out = tmp_path / "sd3.parquet"
    args = ["record", "--diffusers", str(folder), "--embeddings", str(tmp_path / "embeddings.pt"), "--size", "64"]
    args += ["--samples", "1", "--out", str(out)]
    assert main([*args, "--classes", "1", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"attnmed record: error: --classes are class labels, but {folder} holds a StableDiffusion3Pipeline, "
        "which is conditioned on text: choose what it draws with prompts or text embeddings\n"
    )
    assert main([*args, "--steps", "2"]) == 0
    before = out.read_bytes()
    assert main([*args, "--steps", "3"]) == 2
    assert "holds a table of another configuration" in capsys.readouterr().err and out.read_bytes() == before
