"""scripts/imagenet_study.sh, the at-scale recipe, end to end on tiny stand-ins: an ImageFolder of 8 images, a
tiny VAE, a randomly initialised Inception and a made-up reference batch, with every stage at toy budgets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_imagenet_recipe_runs_every_stage_on_stand_ins(tmp_path, tiny_vae_path, random_inception):
    from analysis.quality.adm import AdmInception, write_reference_batch

    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
                tmp_path / "data" / label / f"{i}.png"
            )
    reference = write_reference_batch(
        rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
        AdmInception(random_inception, "cpu"),
        tmp_path / "ref.npz",
    )
    env = {
        **os.environ,
        "DATA": str(tmp_path / "data"),
        "VAE": str(tiny_vae_path),
        "REF": str(reference),
        "INCEPTION": str(random_inception),
        "OUT": str(tmp_path / "study"),
        "MODEL": "SiT-T/2",
        "IMAGE_SIZE": "32",
        "COUNTS": "1 4",
        "TRAIN_STEPS": "2",
        "BATCH": "4",
        "RECORD_SAMPLES": "2",
        "STEPS": "6",  # the adaptive rule with its warm-up of 3 can first switch at evaluation 5
        "CFG": "1.5",
        "FID_SAMPLES": "6",
        "SAMPLE_BATCH": "6",
        "RHO": "0.9",
        "ATTNMED": str(Path(sys.executable).parent / "attnmed"),
        "PYTHON": sys.executable,
    }
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "imagenet_study.sh")], env=env, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "study" / "RESULTS.md").read_text().splitlines()
    runs = {line.split("|")[1].strip() for line in table[2:]}
    assert runs == {"full", "med1", "med4", "derived-rank0.9", "derived-rank0.99", "adaptive"}
    for line in table[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert all(np.isfinite(float(v)) for v in cells[1:])
    assert (tmp_path / "study" / "figures" / "redundancy_heatmap_full.png").exists()
    # A rerun finds every stage done.
    again = subprocess.run(
        ["bash", str(ROOT / "scripts" / "imagenet_study.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0 and "train " not in again.stderr

    # GRAFT_FROM: the mediators grafted onto the trained full network and distilled, one file for every count.
    source = tmp_path / "study" / "train" / "full" / "checkpoints" / "0000002.pt"
    grafted_env = {
        **env,
        "OUT": str(tmp_path / "grafted"),
        "LATENTS": str(tmp_path / "study" / "latents"),
        "GRAFT_FROM": str(source),
        "GRAFT_LAYER_STEPS": "1",
        "GRAFT_STEPS": "2",
        "GRAFT_TRAJECTORY_STEPS": "4",
    }
    grafted = subprocess.run(
        ["bash", str(ROOT / "scripts" / "imagenet_study.sh")],
        env=grafted_env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert grafted.returncode == 0, grafted.stderr[-3000:]
    assert "train " not in grafted.stderr and "graft mediators 1 4" in grafted.stderr
    table = (tmp_path / "grafted" / "RESULTS.md").read_text().splitlines()
    assert {line.split("|")[1].strip() for line in table[2:]} == runs
    shared = tmp_path / "grafted" / "graft" / "end_to_end" / "shared" / "checkpoints" / "0000002.pt"
    for run in ("med1", "med4", "adaptive", "derived-rank0.9"):
        sidecar = json.loads((tmp_path / "grafted" / "samples" / run / "samples.json").read_text())
        assert Path(sidecar["checkpoint"] if "checkpoint" in sidecar else sidecar["checkpoints"][0]) == shared
    full = json.loads((tmp_path / "grafted" / "samples" / "full" / "samples.json").read_text())
    assert Path(full["checkpoint"]) == source
