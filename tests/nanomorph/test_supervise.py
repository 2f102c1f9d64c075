"""``nanomorph.supervise``: stop signals reach the child's whole process group, nothing survives.

A driver process runs :func:`run_supervised` on a small Python child that records the signal it
gets and starts a grandchild in its group which ignores SIGTERM (the worst case: a worker that
will not stop). The tests signal the driver, as systemd or ``docker stop`` would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from nanomorph.supervise import exit_status

REPO_ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import os, signal, subprocess, sys, time
out, mode = sys.argv[1], sys.argv[2]
grand = subprocess.Popen([sys.executable, "-c",
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "open(sys.argv[1], 'w').close(); time.sleep(600)", out + ".grand"])
while not os.path.exists(out + ".grand"):  # the grandchild ignores SIGTERM from now on
    time.sleep(0.02)
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
signal.signal(signal.SIGINT, lambda s, f: got.append(s))
with open(out + ".pids", "w") as fh:
    fh.write(f"{os.getpid()} {grand.pid}")
while not got or mode == "ignore":
    time.sleep(0.05)
with open(out + ".got", "w") as fh:
    fh.write(str(got[0]))
sys.exit(3)
"""

DRIVER = (
    "import sys; from nanomorph.supervise import run_supervised; "
    "sys.exit(run_supervised(sys.argv[3:], grace_s=float(sys.argv[1]), margin_s=float(sys.argv[2])))"
)


def _start(
    tmp_path: Path, mode: str, grace: float = 5.0, margin: float = 5.0
) -> tuple[subprocess.Popen[bytes], Path]:
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    out = tmp_path / "child"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-c", DRIVER, str(grace), str(margin), sys.executable, str(child), str(out), mode]
    driver = subprocess.Popen(cmd, env=env)
    pids = Path(str(out) + ".pids")
    deadline = time.monotonic() + 60
    while not pids.exists() or len(pids.read_text().split()) < 2:
        assert driver.poll() is None, "driver exited early"
        assert time.monotonic() < deadline, "child did not start"
        time.sleep(0.05)
    return driver, out


def _pids(out: Path) -> list[int]:
    return [int(p) for p in Path(str(out) + ".pids").read_text().split()]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pids: list[int], timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if not _gone(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return [p for p in pids if not _gone(p)]


@pytest.mark.parametrize(
    ("sent", "expected"),
    [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGINT), (signal.SIGHUP, signal.SIGTERM)],
)
def test_stop_signal_is_forwarded_and_the_child_status_returned(
    tmp_path: Path, sent: signal.Signals, expected: signal.Signals
) -> None:
    driver, out = _start(tmp_path, "exit")
    pids = _pids(out)
    driver.send_signal(sent)
    assert driver.wait(timeout=60) == 3  # the child's own exit status
    assert int(Path(str(out) + ".got").read_text()) == expected
    assert _wait_gone(pids) == [], "a process of the server's group survived"


def test_a_child_that_ignores_the_signal_is_killed_after_the_grace(tmp_path: Path) -> None:
    driver, out = _start(tmp_path, "ignore", grace=0.5, margin=0.5)
    pids = _pids(out)
    driver.send_signal(signal.SIGTERM)
    assert driver.wait(timeout=60) == 128 + signal.SIGKILL
    assert _wait_gone(pids) == []


def test_exit_status() -> None:
    assert exit_status(0) == 0 and exit_status(3) == 3
    assert exit_status(-signal.SIGTERM) == 128 + signal.SIGTERM
