"""Checkpoints: every accepted layout loads strictly; mismatches explain themselves; resolution adaptation."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_inputs, tiny_model

from mediator_models import CheckpointMismatchError, atomic_save, build_model, load_checkpoint
from mediator_models.network.layers import sincos_pos_embed_2d
from mediator_models.storage.checkpoints import CheckpointError


def outputs(model):
    torch.manual_seed(1)
    x, t, y = tiny_inputs(model)
    with torch.no_grad():
        return model(x, t, y)


@pytest.mark.parametrize("attention,mediators", [("full", None), ("mediator", 4)])
def test_plain_state_dict_file_loads_strictly_and_reproduces_outputs(tmp_path, attention, mediators):
    source = tiny_model(attention=attention, mediators=mediators)
    path = tmp_path / "official.pt"
    torch.save(source.state_dict(), path)
    target = build_model("DiT-T/2", input_size=8, num_classes=10, attention=attention, mediators=mediators).eval()
    load_checkpoint(target, path)
    torch.testing.assert_close(outputs(target), outputs(source), atol=0, rtol=0)


def test_training_checkpoint_uses_ema_by_default_and_strips_the_ddp_prefix():
    raw, ema = tiny_model(), tiny_model()
    checkpoint = {
        "model": {f"module.{k}": v for k, v in raw.state_dict().items()},
        "ema": ema.state_dict(),
        "opt": {},
        "args": {"model": "DiT-T/2"},
        "train_steps": 10,
    }
    target = build_model("DiT-T/2", input_size=8, num_classes=10).eval()
    load_checkpoint(target, checkpoint)
    torch.testing.assert_close(outputs(target), outputs(ema))
    load_checkpoint(target, checkpoint, use_ema=False)
    torch.testing.assert_close(outputs(target), outputs(raw))


def test_wrong_size_lists_keys_and_shapes_and_names_the_cause():
    small = build_model("DiT-T/2", input_size=8, num_classes=10)
    with torch.device("meta"):
        bigger = build_model("DiT-S/2", input_size=8, num_classes=10)
    with pytest.raises(CheckpointMismatchError) as caught:
        load_checkpoint(bigger, small.state_dict())
    message = str(caught.value)
    assert "missing keys (80)" in message and "blocks.4.attn.qkv.weight" in message and "and 68 more" in message
    assert "shape mismatches" in message and "pos_embed: checkpoint (1, 16, 128) vs model (1, 16, 384)" in message
    assert "depth: checkpoint has 4, model has 12" in message and "model size" in message


def test_wrong_mediator_count_and_wrong_attention_kind_are_diagnosed():
    four = build_model("SiT-T/2", input_size=8, num_classes=10, attention="mediator", mediators=4)
    sixteen = build_model("SiT-T/2", input_size=8, num_classes=10, attention="mediator", mediators=16)
    full = build_model("SiT-T/2", input_size=8, num_classes=10)
    with pytest.raises(
        CheckpointMismatchError, match="attention: checkpoint has mediator n=4, model has mediator n=16"
    ):
        load_checkpoint(sixteen, four.state_dict())
    with pytest.raises(
        CheckpointMismatchError, match=r"unexpected keys \(32\)(.|\n)*attention: checkpoint has mediator"
    ):
        load_checkpoint(full, four.state_dict())


def test_wrong_patch_and_resolution_are_diagnosed():
    base = build_model("DiT-T/2", input_size=8, num_classes=10)
    with pytest.raises(CheckpointMismatchError, match="patch_size: checkpoint has 2, model has 4"):
        load_checkpoint(build_model("DiT-T/4", input_size=8, num_classes=10), base.state_dict())
    with pytest.raises(
        CheckpointMismatchError, match="num_tokens: checkpoint has 16, model has 64(.|\n)*adapt_resolution"
    ):
        load_checkpoint(build_model("DiT-T/2", input_size=16, num_classes=10), base.state_dict())


def test_missing_or_corrupt_files_say_so(tmp_path):
    model = tiny_model()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(model, tmp_path / "nope.pt")
    with pytest.raises(CheckpointMismatchError, match="no state dict found"):
        load_checkpoint(model, {"args": {"lr": 1e-4}, "step": 3})


def _trained_checkpoint(tmp_path):
    from mediator_models.train import TrainConfig, train

    run = train(TrainConfig(model="SiT-T/4", steps=1, global_batch_size=8, out=str(tmp_path / "run"), progress=False))
    return run / "checkpoints" / "0000001.pt"


def test_empty_truncated_foreign_and_damaged_checkpoints_each_get_one_line_naming_the_file(tmp_path):
    good = _trained_checkpoint(tmp_path)
    data = good.read_bytes()
    cases = {
        "empty.pt": (b"", "is empty"),
        "truncated.pt": (data[: len(data) // 2], "truncated"),
        "text.pt": (b"not a checkpoint", "not a torch checkpoint"),
    }
    # Damage one weight's bytes in place: the file still unpickles, only the checksum can tell.
    checkpoint = torch.load(good, weights_only=False)
    target = checkpoint["ema"]["blocks.0.attn.qkv.weight"].numpy().tobytes()
    position = data.find(target[:64])
    assert position > 0
    damaged = bytearray(data)
    damaged[position : position + 4] = bytes([0x72, 0x72, 0x72, 0x72])  # a weight of about 4.8e30
    cases["damaged.pt"] = (bytes(damaged), "is damaged: its contents no longer match the checksum")
    for name, (content, expected) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=expected) as caught:
            load_checkpoint(build_model("SiT-T/4", input_size=16, in_channels=1, num_classes=10), path)
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    load_checkpoint(build_model("SiT-T/4", input_size=16, in_channels=1, num_classes=10), good)  # the intact one loads


def test_official_files_without_a_checksum_load_as_before(tmp_path):
    model = tiny_model()
    path = tmp_path / "official.pt"
    torch.save(model.state_dict(), path)
    torch.manual_seed(1)  # a fresh model with other weights, so equality below is the load's doing
    loaded = load_checkpoint(tiny_model(), path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_resolution_adaptation_recomputes_positions_and_resizes_mediator_tables():
    low = tiny_model("SiT-T/2", input_size=8, attention="mediator", mediators=4)  # 4×4 grid
    with torch.no_grad():
        for block in low.blocks:
            block.attn.ah_bias.normal_()
            block.attn.wa_bias.normal_()
    high = build_model("SiT-T/2", input_size=16, num_classes=10, attention="mediator", mediators=4)  # 8×8 grid
    load_checkpoint(high, low.state_dict(), adapt_resolution=True)
    torch.testing.assert_close(high.pos_embed[0], torch.from_numpy(sincos_pos_embed_2d(128, 8)).float())
    src, dst = low.blocks[2].attn, high.blocks[2].attn
    torch.testing.assert_close(dst.ah_bias[..., 0, 0], src.ah_bias[..., 0, 0])  # aligned corners keep the ends
    torch.testing.assert_close(dst.ah_bias[..., -1, 0], src.ah_bias[..., -1, 0])
    expected = F.interpolate(src.wa_bias[0, :, 0].permute(0, 2, 1), size=8, mode="linear", align_corners=True)
    torch.testing.assert_close(dst.wa_bias[0, :, 0], expected.permute(0, 2, 1))
    torch.testing.assert_close(dst.an_bias, src.an_bias)  # 7×7 tables are resolution-free
    torch.testing.assert_close(dst.qkv.weight, src.qkv.weight)
    with torch.no_grad():
        high(torch.randn(1, 4, 16, 16), torch.ones(1), torch.zeros(1, dtype=torch.long))


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_save({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path)["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind


def test_atomic_writes_get_the_normal_file_mode_not_0600(tmp_path):
    previous = os.umask(0o022)
    try:
        path = atomic_save({"step": 1}, tmp_path / "ckpt.pt")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644
