"""Run a server in a child process group and stop it cleanly on SIGTERM / SIGINT / SIGHUP.

``nanomorph serve`` is what systemd, supervisord, ``docker stop`` and Kubernetes signal. Without
help its ``bentoml serve`` child (and the child's workers) would outlive it, re-parented to PID 1
and still holding the port. :func:`run_supervised` therefore:

* starts the child in a process group of its own (so a terminal's Ctrl-C reaches the child only
  through us, once) and, on Linux, asks the kernel to send the child SIGTERM should this process
  die without a chance to forward anything (``PR_SET_PDEATHSIG``);
* forwards SIGTERM and SIGINT to that whole group. SIGHUP is forwarded as SIGTERM: BentoML's
  workers do not handle SIGHUP and would die without draining (its arbiter would treat it as a
  reload), while a hang-up of ``nanomorph serve`` means "stop" to every supervisor;
* waits for the child to drain: at most ``grace_s`` plus :data:`EXIT_MARGIN_S` after the first
  signal, then SIGKILLs the group;
* after the child exits, SIGKILLs whatever is left in its group, so no process survives;
* returns the child's exit status (a child killed by signal N gives ``128 + N``, like a shell).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

#: Signals forwarded to the child's process group, and what each is forwarded as.
FORWARDED = {signal.SIGTERM: signal.SIGTERM, signal.SIGINT: signal.SIGINT, signal.SIGHUP: signal.SIGTERM}
#: Seconds allowed on top of the drain grace for the server's own shutdown (lifespan hooks, the
#: arbiter reaping its workers) before the group is killed.
EXIT_MARGIN_S = 10.0


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM me if my parent dies (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def exit_status(returncode: int) -> int:
    """A Popen return code as a process exit status (killed by signal N -> 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def group_alive(pgid: int) -> bool:
    """True while any process of group ``pgid`` exists."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class _Forwarder:
    """Signal handlers that pass SIGTERM/SIGINT/SIGHUP on to one process group."""

    def __init__(self, pgid: int) -> None:
        self.pgid = pgid
        self.first_at: float | None = None
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if self.first_at is None:
            self.first_at = time.monotonic()
        # A repeated SIGINT is forwarded too: a second Ctrl-C makes uvicorn stop without waiting.
        _killpg(self.pgid, FORWARDED[signal.Signals(signum)])

    def install(self) -> None:
        for sig in FORWARDED:
            self._previous[sig] = signal.signal(sig, self)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _reap_group(pgid: int, timeout: float = 5.0) -> None:
    """After the leader exited: TERM, then KILL, whatever is left in its group."""
    if not group_alive(pgid):
        return
    log.warning("processes of the server are still running after it exited; stopping them")
    _killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    _killpg(pgid, signal.SIGKILL)


def run_supervised(
    cmd: Sequence[str],
    env: Mapping[str, str] | None = None,
    *,
    grace_s: float = 30.0,
    margin_s: float = EXIT_MARGIN_S,
    poll_s: float = 0.2,
) -> int:
    """Runs ``cmd`` until it exits, forwarding stop signals to its process group.

    Args:
        cmd: the child's command line.
        env: its environment (default ours).
        grace_s: how long the child may take to drain after the first stop signal ...
        margin_s: ... plus this, before its whole group is SIGKILLed.
        poll_s: how often the deadline is checked.

    Returns:
        The child's exit status (``128 + N`` when killed by signal N).
    """
    proc = subprocess.Popen(
        list(cmd), env=dict(env) if env is not None else None, process_group=0, preexec_fn=_die_with_parent
    )
    pgid = proc.pid
    forwarder = _Forwarder(pgid)
    forwarder.install()
    try:
        while True:
            try:
                returncode = proc.wait(timeout=poll_s)
                break
            except subprocess.TimeoutExpired:
                pass
            if forwarder.first_at is not None and time.monotonic() - forwarder.first_at > grace_s + margin_s:
                log.error(
                    "the server did not stop within %.0f s of the stop signal; killing it", grace_s + margin_s
                )
                _killpg(pgid, signal.SIGKILL)
                returncode = proc.wait()
                break
    finally:
        forwarder.restore()
        if proc.poll() is None:  # an exception in this loop: take the child down with us
            _killpg(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace_s + margin_s)
            _killpg(pgid, signal.SIGKILL)
        _reap_group(pgid)
    if forwarder.received:
        names = ", ".join(signal.Signals(s).name for s in forwarder.received)
        log.info("server stopped (%s) with exit status %d", names, exit_status(returncode))
    return exit_status(returncode)
