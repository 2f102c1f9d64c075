"""Write-then-rename: the old file or the new one, never half; nothing left behind on failure."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from nanomorph.atomic import atomic_path, atomic_write_bytes, atomic_write_text


def test_replaces_the_file_with_the_usual_mode_and_creates_the_folder(tmp_path: Path) -> None:
    target = tmp_path / "new" / "folder" / "result.csv"
    atomic_write_text(target, "a,b\n")
    assert target.read_text() == "a,b\n"
    atomic_write_bytes(target, b"c,d\n", fsync=True)
    assert target.read_bytes() == b"c,d\n"
    umask = os.umask(0)
    os.umask(umask)
    # mkstemp would leave 0600; results are meant to be read by colleagues and services.
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.csv"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "frame.tif"
    target.write_bytes(b"old")
    seen: list[Path] = []
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        seen.append(tmp)
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["frame.tif"]
    # Hidden (folder scanners skip it) and with the target's suffix (writers pick the format from it).
    assert seen[0].parent == tmp_path
    assert seen[0].name.startswith(".frame.tif.") and seen[0].suffix == ".tif"
