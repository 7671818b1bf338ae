"""Atomic file writes: a crash mid-write never leaves a half-written file in place of a good one.

Files get the mode `open()` would give them (0666 less the umask, 0644 under the usual umask), so a
colleague can read a run's checkpoints. A torch file is written with a checksum beside it
(`<file>.sha256`, in `sha256sum` format) that `verify_checksum` checks on load.

torch is imported only by `atomic_torch_save`, so the configuration and the command line's help can
write files without loading it."""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any


from .errors import UserError


def ensure_folder(path: str | os.PathLike, fix: str = "choose a writable location") -> Path:
    """Create `path` and its parents, or raise `UserError` naming what stands in the way, and `fix`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        # mkdir says 'File exists' or 'Not a directory' when a file stands on the way: name it
        in_the_way = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        reason = f"{str(in_the_way)!r} is a file" if in_the_way else e.strerror or e
        raise UserError(f"cannot create folder {str(path)!r}: {reason}; {fix}") from None
    return path


def require_file_path(path: str | os.PathLike) -> Path:
    """`path` as a Path, or a UserError when a folder stands there (a file cannot replace it)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{str(path)!r} is a folder, not a file to write; give a file name (one inside it, say)")
    return path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; set it straight back
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync it, then rename it over `path`.

    The old file stays intact until the new one is complete on disk. A process killed mid-write
    (SIGKILL, a lost node) leaves its temporary file behind, as big as the file itself; the next
    successful write of `path` removes such leftovers, so one writer per path is assumed.
    """
    path = require_file_path(path)
    ensure_folder(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise UserError(f"cannot write {str(path)!r}: {e.strerror or e}; choose a writable location") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):  # disk full, quota, a folder in the way: the old file is intact
            reason = e.strerror or e
            raise UserError(f"cannot write {str(path)!r}: {reason}; the previous file, if any, is unchanged") from None
        raise
    _fsync_dir(path.parent)
    for stale in path.parent.glob(glob.escape(_temp_prefix(path)) + "*.tmp"):
        stale.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


CHECKSUM_SUFFIX = ".sha256"


def checksum_path(path: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(path)}{CHECKSUM_SUFFIX}")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to `path` atomically, with its checksum beside it.

    The old checksum goes first: a crash between the two writes leaves a file without a checksum
    (loaded unverified), never a good file with a stale checksum (refused as corrupt)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    ensure_folder(Path(path).parent)
    checksum_path(path).unlink(missing_ok=True)
    atomic_write_bytes(path, data)
    atomic_write_text(checksum_path(path), f"{digest}  {Path(path).name}\n")


def verify_checksum(path: str | os.PathLike) -> None:
    """Compare `path` with the checksum written beside it, if there is one; a mismatch is a UserError."""
    sidecar = checksum_path(path)
    try:
        expected = sidecar.read_text(encoding="utf-8", errors="replace").split()[0].lower()
    except (OSError, IndexError):  # none, or unreadable: nothing to verify against
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise UserError(
            f"checkpoint {str(path)!r} does not match its checksum {str(sidecar)!r}: the file is corrupt "
            "(or was replaced); use an intact copy, or delete the .sha256 file if the replacement is intended"
        )


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line and fsync, so a record is either wholly on disk or absent."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
