"""Progress for folder-wide jobs (predict, client, watch, index): a tqdm bar on a terminal,
otherwise a log line every 10 s and one at the end (CI logs, nohup, services)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("nanomorph.progress")


class Progress:
    """Counts processed images; ``update(n)`` as they finish, ``close()`` at the end."""

    def __init__(self, total: int, desc: str, logger: logging.Logger | None = None) -> None:
        self.total, self.desc, self.n = total, desc, 0
        self._log = logger or log
        self._last = time.monotonic()
        self._bar: Any = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="img")

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif time.monotonic() - self._last >= 10.0:
            self._last = time.monotonic()
            self._log.info("%s: %d/%d images", self.desc, self.n, self.total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.total:
            self._log.info("%s: %d/%d images", self.desc, self.n, self.total)
