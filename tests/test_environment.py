"""The environment files: environment.yml parses and pins exactly what requirements.txt pins."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def requirement_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def test_every_requirement_is_pinned_exactly():
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        assert not line or line.count("==") == 1, f"unpinned requirement: {line}"


def test_torch_and_torchvision_are_pinned_together_and_installed_as_pinned():
    """Both are pinned in the same set (any other torch request pulls a new multi-GB build), and the environment
    the tests run in is the one the pins describe."""
    import torch
    import torchvision

    pins = requirement_pins()
    assert {"torch", "torchvision"} <= set(pins)
    assert torch.__version__.split("+")[0] == pins["torch"]
    assert torchvision.__version__.split("+")[0] == pins["torchvision"]


def test_environment_yml_pip_pins_agree_with_requirements():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["name"] == "attnmed"
    pip_section = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict))
    conda_pins = dict(entry.lower().split("==") for entry in pip_section)
    assert conda_pins == requirement_pins()
    assert "python=3.11" in env["dependencies"]


@pytest.mark.slow  # builds two environments and runs their interpreters
def test_two_checkouts_each_run_their_own_code_and_outlive_each_other(tmp_path):
    """scripts/ensure_venv.sh gives each checkout its own small .venv over one shared heavy install: running
    `.venv/bin/attnmed` or `.venv/bin/python` from any folder imports that checkout's code, and deleting one
    checkout leaves the other working. (Uses the shared install this test runs in: seconds, not minutes.)"""
    import shutil
    import subprocess
    import time

    checkouts = {}
    for name in ("first", "second"):
        root = tmp_path / name
        for part in ("scripts", "analysis", "mediator_models"):
            shutil.copytree(ROOT / part, root / part, ignore=shutil.ignore_patterns("__pycache__"))
        for part in ("requirements.txt", "pyproject.toml"):
            shutil.copy(ROOT / part, root / part)
        with (root / "analysis" / "__init__.py").open("a") as handle:
            handle.write(f"\nCHECKOUT = {name!r}\n")
        start = time.time()
        subprocess.run(["bash", "scripts/ensure_venv.sh"], cwd=root, check=True)
        assert time.time() - start < 60  # the heavy install is reused
        checkouts[name] = root
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = "import analysis, torch; print(analysis.CHECKOUT, analysis.__file__)"
    for name, root in checkouts.items():
        out = subprocess.run(
            [str(root / ".venv/bin/python"), "-c", probe], cwd=elsewhere, capture_output=True, text=True, check=True
        ).stdout.split()
        assert out == [name, str(root / "analysis" / "__init__.py")]
        script = (root / ".venv/bin/attnmed").read_text().splitlines()[0]
        assert script == f"#!{root}/.venv/bin/python"
        help_text = subprocess.run(
            [str(root / ".venv/bin/attnmed"), "--help"], cwd=elsewhere, capture_output=True, text=True, check=True
        ).stdout
        assert "reproduce" in help_text
    shutil.rmtree(checkouts["first"])
    out = subprocess.run(
        [str(checkouts["second"] / ".venv/bin/python"), "-c", probe],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[0] == "second"
