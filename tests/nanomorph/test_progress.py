"""nanomorph.progress: the one progress display (a tqdm bar on a terminal, log lines otherwise)."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from nanomorph import progress as progress_mod
from nanomorph.progress import Progress, progress


@pytest.fixture
def plain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_mod, "on_terminal", lambda: False)


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "nanomorph.progress"]


def test_plain_lines_every_tenth_and_at_the_end(plain: None, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="nanomorph.progress"):
        bar = progress(range(25), desc="decode")
        assert list(bar) == list(range(25))
    lines = _lines(caplog)
    counts = [line.split()[1] for line in lines]
    assert counts == ["2/25", "4/25", "6/25", "8/25", "10/25", "12/25", "14/25", "16/25", "18/25",
                      "20/25", "22/25", "24/25", "25/25"]  # fmt: skip
    assert all(line.startswith("decode: ") and "it/s" in line for line in lines)


def test_postfix_shown_in_plain_lines(plain: None, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="nanomorph.progress"):
        bar = progress(range(4), desc="epoch 1/1", every=2)
        for _ in bar:
            bar.set_postfix(loss=0.123456, cell="a")
    assert _lines(caplog)[-1].endswith("loss=0.1235 cell=a") and " 4/4 it " in _lines(caplog)[-1]


def test_disabled_shows_nothing(plain: None, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="nanomorph.progress"):
        assert list(progress(range(5), desc="x", enabled=False)) == list(range(5))
        p = Progress(3, "y", enabled=False)
        p.update(3)
        p.close()
    assert _lines(caplog) == []


def test_folder_job_counter_logs_on_time_and_at_close(plain: None, caplog: pytest.LogCaptureFixture) -> None:
    """Folder jobs (predict, index, ...): a line every 10 s by default, plus one at the end."""
    with caplog.at_level(logging.INFO, logger="nanomorph.progress"):
        p = Progress(10, "predict")
        p.update(3)
        p.update(4)
        assert _lines(caplog) == []  # well under 10 s: no line yet
        p.update(3)
        p.close()
    assert len(_lines(caplog)) == 1 and _lines(caplog)[0].startswith("predict: 10/10 img")


def test_own_logger(plain: None, caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("nanomorph.synth")
    with caplog.at_level(logging.INFO, logger="nanomorph.synth"):
        p = Progress(20, "synth particles", interval_s=None, logger=logger)  # a line every 2
        for _ in range(20):
            p.update()
        p.close()
    assert [r.name for r in caplog.records] == ["nanomorph.synth"] * 10


def test_terminal_gets_a_tqdm_bar(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(progress_mod, "on_terminal", lambda: True)
    bar = progress(range(3), desc="finetune")
    for _ in bar:
        bar.set_postfix(loss=1.0)
    err = capsys.readouterr().err
    assert "finetune: " in err and "/3 [" in err and "loss=1" in err
    p = Progress(3, "predict")  # a folder job's bar stays on screen, finished
    p.update(3)
    p.close()
    assert "predict: 100%" in capsys.readouterr().err


def test_plain_progress_env_forces_log_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setenv("NANOMORPH_PLAIN_PROGRESS", "1")
    assert not progress_mod.on_terminal()
    monkeypatch.delenv("NANOMORPH_PLAIN_PROGRESS")
    assert progress_mod.on_terminal()


def test_no_torch_import() -> None:
    code = "import sys, nanomorph.progress; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
