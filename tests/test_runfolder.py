"""Run folders: one live writer per folder, released when it dies; identities that refuse mixing; atomic writes
that survive a full disk; folders that cannot be written are named before any work."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mediator_models.storage.checkpoints import atomic_save
from mediator_models.storage.runfolder import (
    ConfigurationMismatchError,
    FolderBusyError,
    FolderLock,
    check_writable,
    claim_identity,
    clean_stale_temporaries,
)

HOLD_LOCK = """
import sys, time
from mediator_models.storage.runfolder import FolderLock
FolderLock(sys.argv[1], "a test holder").acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold_lock_in_another_process(folder) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_is_refused_and_a_killed_holder_releases_the_folder(tmp_path):
    holder = hold_lock_in_another_process(tmp_path)
    try:
        with pytest.raises(FolderBusyError, match=rf"in use by another run \(a test holder, pid {holder.pid}"):
            FolderLock(tmp_path, "attnmed sample").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with FolderLock(tmp_path, "attnmed sample"):  # kill -9 left the lock file, not the lock
        with pytest.raises(FolderBusyError):
            FolderLock(tmp_path, "attnmed sample").acquire()  # and it holds within one process too


def test_identity_resumes_the_same_configuration_and_names_each_difference(tmp_path):
    path = tmp_path / "sampling.json"
    assert claim_identity(path, {"seed": 0, "steps": 8, "checkpoint": "a.pt"}, what="samples", fix="fix it") is False
    assert (
        claim_identity(
            path, {"seed": 0, "steps": 8, "checkpoint": "b.pt"}, what="samples", fix="fix it", ignore=["checkpoint"]
        )
        is True
    )
    with pytest.raises(ConfigurationMismatchError) as caught:
        claim_identity(path, {"seed": 1, "steps": 8, "cfg": 2.0}, what="samples", fix="choose another --out")
    message = str(caught.value)
    assert "seed: folder has 0, this run has 1" in message and "cfg: folder has (not set), this run has 2.0" in message
    assert "steps" not in message and message.endswith("choose another --out")


def test_stale_temporaries_of_killed_writes_are_cleaned(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    stale = tmp_path / "checkpoints" / ".0000100.pt.abc123.tmp"
    stale.write_bytes(b"x" * 1000)
    kept = tmp_path / "checkpoints" / "0000050.pt"
    kept.write_bytes(b"y")
    assert clean_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and kept.exists()


def test_a_full_disk_keeps_the_last_good_file_and_says_so(tmp_path, monkeypatch):
    path = atomic_save({"step": 1}, tmp_path / "ckpt.pt")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(
        OSError, match="no space left on the device while writing .*ckpt.pt; the previous version is kept"
    ):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1 and os.listdir(tmp_path) == ["ckpt.pt"]


def test_unwritable_folders_are_refused_before_any_work(tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="--out .*file is a file, not a folder"):
        check_writable(a_file)
    import tempfile

    for code, reason in ((errno.EROFS, "the file system is read-only"), (errno.ENOSPC, "the disk is full")):

        def refuse(*args, code=code, **kwargs):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
        with pytest.raises(ValueError, match=f"cannot write into --out .*: {reason}"):
            check_writable(tmp_path / "out")
        monkeypatch.undo()


def test_lock_holder_is_described_for_the_refused_run(tmp_path):
    with FolderLock(tmp_path, "attnmed train"):
        text = (tmp_path / ".lock").read_text()
    assert text.startswith("attnmed train, pid ") and time.strftime("%Y-") in text


def test_a_released_lock_leaves_no_file_and_a_lock_on_a_removed_file_is_taken_again(tmp_path, monkeypatch):
    from mediator_models.storage import runfolder

    with FolderLock(tmp_path, "attnmed record", name=".table.parquet.lock"):
        assert (tmp_path / ".table.parquet.lock").exists()
    assert list(tmp_path.iterdir()) == []  # `record` leaves no .TABLE.lock beside each table
    # A second run that opened the file just before the first removed it holds a lock on an unlinked file:
    # it must notice, and lock the file that is there now, or two runs would hold "the" lock at once.
    real_open, opened = os.open, []

    def open_then_lose_the_race(path, *args):
        fd = real_open(path, *args)
        if str(path).endswith(".lock"):
            if not opened:
                os.unlink(path)  # the first holder releases between our open and our flock
            opened.append(fd)
        return fd

    monkeypatch.setattr(runfolder.os, "open", open_then_lose_the_race)
    lock = FolderLock(tmp_path, "attnmed record").acquire()
    assert len(opened) == 2 and (tmp_path / ".lock").exists()
    lock.release()
    assert not (tmp_path / ".lock").exists()
