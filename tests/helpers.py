"""Small models and inputs for fast tests."""

from __future__ import annotations

import torch

from mediator_models import build_model


def tiny_model(name: str = "DiT-T/2", *, input_size: int = 8, attention: str = "full", mediators=None, **kwargs):
    """A 4-layer, 128-wide model on a small grid, with random (not zero) output and adaLN layers.

    DiT's initialisation zeroes the adaLN and output layers, which would make every test of outputs trivial;
    randomising them gives a network whose every path changes the output.
    """
    kwargs.setdefault("in_channels", 4)
    kwargs.setdefault("num_classes", 10)
    model = build_model(name, input_size=input_size, attention=attention, mediators=mediators, **kwargs)
    with torch.no_grad():
        for name_, param in model.named_parameters():
            if "adaLN_modulation" in name_ or "final_layer.linear" in name_:
                param.normal_(0, 0.05)
    return model.eval()


def tiny_inputs(model, batch: int = 3):
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size)
    t = torch.rand(batch) * 999
    y = torch.randint(0, cfg.num_classes, (batch,))
    return x, t, y
