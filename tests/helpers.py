"""Small models and inputs for fast tests, and a two-rank launcher."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

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


def run_two_gloo_ranks(code: str, timeout: float = 300) -> list[int]:
    """Run `code` in two Python processes set up as torchrun sets up ranks (Gloo on loopback); exit codes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env))
    return [p.wait(timeout=timeout) for p in procs]
