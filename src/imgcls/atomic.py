"""Atomic file writes: the one way imgcls writes a file that someone may read while it is written.

Every write goes to a temp file in the target's folder and is renamed over the target, so a reader
(or a run killed mid-write) sees the old file or the new one, never half of either. The rename
replaces a symlink planted at the target instead of writing through it. The temp file is opened
with the process's normal mode (0666 less the umask), not mkstemp's 0600, so a model folder copied
to a server or shared with a colleague stays readable by them; a writer that swaps its own file in
at the temp path (safetensors' `save_file` writes a 0600 temp file and renames it) gets that mode
put back before the rename.

A write that fails for want of space (ENOSPC, a quota, a file size limit) or any other OS error is a
`WriteError` that names the file (and says when the disk may be full); the old file stays in place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # disk full, quota full, file size limit (ulimit -f)


class WriteError(OSError):
    """A file could not be written; the message names it, and the file there is left as it was."""

    def __init__(self, path: str | os.PathLike, cause: OSError) -> None:
        hint = " - the disk may be full (or a quota or file size limit reached)" if cause.errno in _NO_SPACE else ""
        super().__init__(f"could not write {path}: {cause.strerror or cause}{hint}; the file there is left as it was")
        self.errno, self.path = cause.errno, Path(path)  # not .filename: OSError's str() would then drop the message


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temp path next to `path`; when the block ends without an error, rename it
    over `path`. On an error (a full disk, a crash in the writer) the temp file is removed and
    `path` is left as it was."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        # O_EXCL: never reuse or follow something already there; the mode is 0666 & ~umask.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        normal = stat.S_IMODE(os.fstat(fd).st_mode)  # read back rather than os.umask(), which is not thread-safe
        os.close(fd)
        yield tmp
        st = os.lstat(tmp)
        if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != normal:  # the writer replaced our file with its own
            os.chmod(tmp, normal)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see the module docstring); a `WriteError` when it cannot."""
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:  # the bare error ("[Errno 27] File too large") names no file, or only the temp file
        raise WriteError(path, e) from e


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` as UTF-8 to `path` atomically (see the module docstring)."""
    atomic_write_bytes(path, text.encode("utf-8"))
