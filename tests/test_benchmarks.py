"""The prepared GPU check runs its whole plumbing at a toy scale on any machine."""

from __future__ import annotations

import sys
from pathlib import Path


def test_gpu_check_plumbing_runs_tiny(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.gpu_check import run

    rows = run(tiny=True, folder=tmp_path)
    assert [row[0].split()[0] for row in rows] == ["record", "sample"]
    assert all(float(row[3]) > 0 for row in rows)
    assert (tmp_path / "samples" / "samples.npz").exists() and (tmp_path / "table.parquet").exists()
