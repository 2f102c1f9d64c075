"""The one progress display of every long job (synth, predict, client, watch, index, map, suggest,
pretrain, finetune, study): a tqdm bar on a terminal, otherwise plain log lines (CI logs, ``nohup``,
services) — one every ``every`` items or ``interval_s`` seconds, and one at the end.

``NANOMORPH_PLAIN_PROGRESS=1`` asks for the log lines on a terminal too. No torch here: the
library side (``nanomorph/``) stays free of it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger("nanomorph.progress")


def on_terminal() -> bool:
    """A bar only where someone watches: stderr is a terminal and plain lines were not asked for."""
    return sys.stderr.isatty() and os.environ.get("NANOMORPH_PLAIN_PROGRESS") != "1"


def _format_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Progress:
    """Counts finished items: ``update(n)`` as they finish (or iterate over it), ``close()`` at the end.

    Args:
        total: how many items, when known.
        desc: label of the bar / log lines.
        unit: what an item is (``img`` for images, ``it`` for steps).
        enabled: False on non-zero DDP ranks and for inner loops: then nothing is shown.
        every: plain mode, a line every N items.
        interval_s: plain mode, a line when this many seconds passed since the last one (folder
            jobs: every 10 s). With neither: a line every tenth of ``total``.
        logger: where plain lines go (default ``nanomorph.progress``).
        iterable: what iterating over this object yields (counting one per item).
        leave: keep the finished bar on screen (False for bars that repeat, like epochs).
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        *,
        unit: str = "img",
        enabled: bool = True,
        every: int | None = None,
        interval_s: float | None = 10.0,
        logger: logging.Logger | None = None,
        iterable: Iterable[Any] | None = None,
        leave: bool = True,
    ) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.enabled = enabled
        self.iterable = iterable
        self.postfix: dict[str, Any] = {}
        self._log = logger or log
        self._every = every if every or interval_s else max(1, (total or 100) // 10)
        self._interval_s = interval_s
        self._start = self._last_time = time.monotonic()
        self._last_logged = 0
        self._bar: Any = None
        if enabled and on_terminal():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=leave)

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("Progress: nothing to iterate (pass iterable=...)")
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and self._due():
            self._log_line()

    def set_postfix(self, **values: Any) -> None:
        """Latest numbers (loss, lr, ...) shown beside the count."""
        self.postfix = values
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.n and self.n != self._last_logged:
            self._log_line()

    def _due(self) -> bool:
        if self.total is not None and self.n >= self.total > self._last_logged:
            return True  # the last item: always one line
        if self._every and self.n - self._last_logged >= self._every:
            return True
        return self._interval_s is not None and time.monotonic() - self._last_time >= self._interval_s

    def _log_line(self) -> None:
        now = time.monotonic()
        rate = self.n / max(now - self._start, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        extra = "".join(f" {k}={_format_value(v)}" for k, v in self.postfix.items())
        self._log.info("%s: %d%s %s (%.2f %s/s)%s", self.desc, self.n, of, self.unit, rate, self.unit, extra)
        self._last_time, self._last_logged = now, self.n


def progress(
    iterable: Iterable[Any],
    total: int | None = None,
    desc: str = "",
    enabled: bool = True,
    every: int | None = None,
    logger: logging.Logger | None = None,
    unit: str = "it",
) -> Progress:
    """Wraps ``iterable`` in a :class:`Progress` (a bar that does not stay after the loop); plain
    lines every ``every`` items (default: a tenth of ``total``, which defaults to ``len(iterable)``)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    return Progress(
        total,
        desc,
        unit=unit,
        enabled=enabled,
        every=every,
        interval_s=None,
        logger=logger,
        iterable=iterable,
        leave=False,
    )
