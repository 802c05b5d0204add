"""Run folders that never mix or lose work: a lock per folder, the configuration a folder was started with,
atomic writes with the normal file mode, and early checks that the folder can be written at all.

Every writer of a run folder (training, sampling, recording, the reproduction) follows one protocol:

    with FolderLock(out, "attnmed sample"):      # a second concurrent run into `out` is refused
        claim_identity(out / "sampling.json", identity, ...)   # a restart must have the same configuration
        clean_stale_temporaries(out)              # leftovers of a killed write, safe to drop under the lock
        ... atomic_write(...) ...

The lock is an advisory `flock` on `out/.lock`: the kernel releases it when its holder exits, however it
exits (kill -9 included), so a dead run never blocks the next one. A run that ends removes the file (a killed
one leaves it, harmless: only a held lock refuses). It works on local file systems and on most
cluster file systems that support flock; on one that does not, two runs are refused only by their identity.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from mediator_models.storage.errors import ConfigurationMismatchError, FolderBusyError

TEMPORARY_GLOB = ".*.tmp"  # every temporary that `atomic_write` makes: .<name>.<random>.tmp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], *, binary: bool = True) -> Path:
    """Write `path` through `write(handle)` into a temporary beside it, fsync, then rename over `path`.

    A kill or a full disk at any moment leaves the previous file (or none) and at most one temporary, which
    `clean_stale_temporaries` removes on the next start. The file gets the mode a plain `open` would give
    (0666 less the umask), not mkstemp's 0600, so collaborators can read results.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            kept = "the previous version is kept" if path.exists() else "nothing was written"
            raise OSError(
                errno.ENOSPC,
                f"no space left on the device while writing {path}; {kept}. "
                "Free some space and run the same command again",
            ) from error
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text), binary=False)


def atomic_write_json(path: str | os.PathLike, value: Any) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=2, default=str) + "\n")


def clean_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that killed writes left anywhere under `folder`. Call it holding the lock."""
    removed = []
    for stale in Path(folder).rglob(TEMPORARY_GLOB):
        if stale.is_file():
            stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def check_writable(folder: str | os.PathLike, flag: str = "--out") -> Path:
    """Create `folder` if needed and prove a file can be written there, before any work starts."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} {folder} is a file, not a folder; choose a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=".tmp", dir=folder)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as error:
        reason = {
            errno.ENOSPC: "the disk is full",
            errno.EROFS: "the file system is read-only",
            errno.EACCES: "permission denied",
            errno.EPERM: "permission denied",
        }.get(error.errno, error.strerror)
        raise ValueError(f"cannot write into {flag} {folder}: {reason}; choose another folder or free space") from None
    return folder


def check_creatable(folder: str | os.PathLike, flag: str = "--out") -> Path:
    """Prove, before any work starts, that `folder` can be written into, without creating it: the folder if
    it exists, else the nearest folder above it that does. Nothing is left behind when the work is refused."""
    folder = Path(folder)
    if folder.exists():
        return check_writable(folder, flag)
    parent = next(p for p in folder.absolute().parents if p.exists())
    if not parent.is_dir():
        raise ValueError(f"cannot make {flag} {folder}: {parent} is a file, not a folder; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        reason = "the file system is read-only" if _read_only(parent) else "permission denied"
        raise ValueError(f"cannot write into {flag} {folder}: {reason} in {parent}; choose another folder")
    return folder


def _read_only(folder: Path) -> bool:
    return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)


def missing_folders(folder: str | os.PathLike) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first: what creating it would make."""
    folder = Path(folder).absolute()
    return [p for p in [folder, *folder.parents] if not p.exists()]


def remove_if_unused(created: list[Path], lock_name: str = ".lock") -> None:
    """Remove the folders of `created` (from `missing_folders`, before the run made them) that the run left
    holding nothing but its lock, so that a start refused by a check leaves no empty run folder behind. Call it
    holding the lock: a second run that opens the lock meanwhile keeps its folder (it is no longer empty)."""
    if not created or not created[0].is_dir():
        return
    if {p.name for p in created[0].iterdir()} - {lock_name}:
        return  # the run wrote something: it stays
    (created[0] / lock_name).unlink(missing_ok=True)
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (another writer arrived) or not ours to remove


class FolderLock:
    """Hold an exclusive lock on a run folder while writing into it; refuse if another process holds it.

    `what` names the kind of run in messages ("attnmed train"). A second lock on the same folder and name is
    refused even within one process.
    """

    def __init__(self, folder: str | os.PathLike, what: str, flag: str = "--out", name: str = ".lock"):
        self.folder = Path(folder)
        self.what = what
        self.flag = flag
        self.name = name  # several outputs sharing a folder (tables) each lock their own name
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        check_writable(self.folder, self.flag)
        path = self.folder / self.name
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise FolderBusyError(
                    f"{self.folder} is in use by another run ({holder}); wait for it to finish, or use another "
                    f"{self.flag}. Two runs never share one folder."
                ) from None
            # The holder we waited on removes the file as it releases it: a lock on that unlinked file guards
            # nothing, so take the lock again on the file that is there now.
            if _same_file(fd, path):
                break
            os.close(fd)
        holder = f"{self.what}, pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Unlock and remove the lock file (still holding the lock, so no one is between its check and ours): a
        finished run leaves no lock behind."""
        if self._fd is not None:
            path = self.folder / self.name
            if _same_file(self._fd, path):
                path.unlink(missing_ok=True)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def differences(saved: Mapping[str, Any], current: Mapping[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """One line per top-level setting whose value differs between two configurations."""
    ignored = set(ignore)
    keys = [k for k in dict.fromkeys([*saved, *current]) if k not in ignored]
    missing = object()
    lines = []
    for key in keys:
        before, after = saved.get(key, missing), current.get(key, missing)
        if _normalise(before) != _normalise(after):
            shown = lambda v: "(not set)" if v is missing else json.dumps(v, default=str)  # noqa: E731
            lines.append(f"{key}: folder has {shown(before)}, this run has {shown(after)}")
    return lines


def _normalise(value: Any) -> Any:
    """Compare as JSON would store it (tuples and lists alike)."""
    return json.loads(json.dumps(value, default=str)) if value is not None else None


def claim_identity(
    path: str | os.PathLike, identity: Mapping[str, Any], *, what: str, fix: str, ignore: Iterable[str] = ()
) -> bool:
    """Record the configuration a folder's work belongs to, or check that a restart has the same one.

    Returns True when the folder was already started with this configuration (a resume). Raises
    `ConfigurationMismatchError` naming each differing setting and `fix` (how to proceed) otherwise.
    """
    path = Path(path)
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise ConfigurationMismatchError(
                f"{path} is damaged, so the work in {path.parent} cannot be matched to a configuration; {fix}"
            ) from None
        lines = differences(saved, identity, ignore)
        if lines:
            raise ConfigurationMismatchError(
                f"{path.parent} holds {what} of another configuration:\n  " + "\n  ".join(lines) + f"\n{fix}"
            )
        return True
    atomic_write_json(path, dict(identity))
    return False
