"""Write-then-rename: readers (and a resumed run) see the old file or the new one, never half of one.

Every file nanomorph writes for later goes through :func:`atomic_path` (or one of the two
helpers built on it), so all of them share one behaviour: a hidden temporary file beside the
target with the target's suffix (writers such as Pillow pick the format from it), removed if the
writing fails, the usual file mode (0666 minus the umask, not ``mkstemp``'s 0600, so colleagues
and facility services can read results), optionally ``fsync`` before the rename, then
``os.replace``. Folder scanners skip hidden files, so a temporary file is never taken for data.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once: os.umask can only be read by setting it, which is not safe while threads create files.
_FILE_MODE = 0o666 & ~_read_umask()


@contextmanager
def atomic_path(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` to write to; renames it over ``path`` when the block
    ends without an exception, deletes it otherwise.

    Args:
        path: the file to (re)place; its folder is created if missing.
        fsync: flush the file to disk before the rename (checkpoints: survive a power cut, not only
            a killed process).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = False) -> None:
    """Writes ``data`` to ``path`` through :func:`atomic_path`."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str, *, fsync: bool = False) -> None:
    """Writes ``text`` (UTF-8) to ``path`` through :func:`atomic_path`."""
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)
