"""Atomic file writes: a crash mid-write never leaves a half-written file in place of a good one.

torch is imported only by `atomic_torch_save`, so the configuration and the command line's help can
write files without loading it."""
from __future__ import annotations

import glob
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any


from .errors import UserError


def ensure_folder(path: str | os.PathLike) -> Path:
    """Create `path` and its parents, or raise `UserError` naming what stands in the way."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create folder {str(path)!r}: {e.strerror or e}; choose a writable location") from None
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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync it, then rename it over `path`.

    The old file stays intact until the new one is complete on disk. A process killed mid-write
    (SIGKILL, a lost node) leaves its temporary file behind, as big as the file itself; the next
    successful write of `path` removes such leftovers, so one writer per path is assumed.
    """
    path = Path(path)
    ensure_folder(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise UserError(f"cannot write {str(path)!r}: {e.strerror or e}; choose a writable location") from None
    try:
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


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line and fsync, so a record is either wholly on disk or absent."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
