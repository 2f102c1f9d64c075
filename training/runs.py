"""One policy for what a command does with the run folder (or store entry) it is about to write.

Every run-producing command (``pretrain``, ``finetune-cls``, ``finetune-seg``, ``export``) asks
:func:`decide` before any work, with what it found there (:class:`RunState`) and its settings:

* nothing there, or ``--force``: **start** (over);
* the settings that change the result differ from the saved ones: **refuse**, with the keys that
  changed, ``old -> new`` (:class:`SettingsChanged`, a ValueError: the CLI answers exit status 2);
* a finished run with the same settings: **skip** (the command reports it and does nothing);
* an interrupted one: **resume** it. A command whose resume must be asked for (``pretrain``:
  its ``--resume``) passes ``resume=False`` without the flag and is refused with a hint instead.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Action", "RunState", "SettingsChanged", "decide", "describe_diff", "settings_diff"]

log = logging.getLogger("nanomorph.runs")


class Action(enum.Enum):
    START = "start"
    SKIP = "skip"
    RESUME = "resume"


@dataclass(frozen=True)
class RunState:
    """What a run folder holds: ``finished`` (its final files are there), ``started`` (an
    interrupted run: a checkpoint, a log, a config), the ``saved`` settings (None: unknown) and a
    ``progress`` note for messages (``epoch 2/4``)."""

    finished: bool = False
    started: bool = False
    saved: Mapping[str, Any] | None = None
    progress: str = ""

    @property
    def empty(self) -> bool:
        return not (self.finished or self.started)


class SettingsChanged(ValueError):
    """The folder holds a run made with other settings; ``diff`` is ``{key: (old, new)}``."""

    def __init__(self, message: str, diff: dict[str, tuple[Any, Any]]) -> None:
        super().__init__(message)
        self.diff = diff


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def settings_diff(
    saved: Mapping[str, Any], current: Mapping[str, Any], keys: Iterable[str] | None = None
) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved, current)}`` for every key (default: of either mapping) whose value differs.

    Values count as equal when ``==`` says so or their JSON is the same (a YAML list read back
    against a tuple, dict order).
    """
    names = list(keys) if keys is not None else sorted(set(saved) | set(current))
    diff = {}
    for key in names:
        old, new = saved.get(key), current.get(key)
        if old != new and _canonical(old) != _canonical(new):
            diff[key] = (old, new)
    return diff


def describe_diff(diff: Mapping[str, tuple[Any, Any]]) -> str:
    """``key: old -> new; ...`` (values in repr, so strings and numbers read apart)."""
    return "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in diff.items())


def decide(
    out: str | Path,
    state: RunState,
    current: Mapping[str, Any],
    *,
    force: bool = False,
    resume: bool | None = None,
    keys: Iterable[str] | None = None,
    force_flag: str = "--force",
    before_they_existed: Mapping[str, Any] | None = None,
) -> Action:
    """The action for ``out`` (see the module docstring).

    Args:
        out: the run folder (or store entry), named in messages.
        state: what ``out`` holds.
        current: this invocation's settings; compared with ``state.saved`` over ``keys``.
        force: start over whatever is there.
        resume: None resumes an interrupted run by itself; False (a command whose resume must be
            asked for, without ``--resume``) refuses it with a hint; True resumes.
        keys: the settings that change the result (default: every key of either mapping).
        force_flag: how the command spells ``--force`` in messages.
        before_they_existed: the value each setting had before it existed; saved settings that
            lack a key ``current`` has (a run from then) are compared as that value.

    Raises:
        SettingsChanged: the saved settings differ (the message lists each key, old -> new).
        ValueError: an interrupted run and ``resume`` is False.
    """
    if force:
        if not state.empty:
            log.info("%s: %s starts over", out, force_flag)
        return Action.START
    if state.empty:
        return Action.START
    kind = "finished" if state.finished else "unfinished"
    saved = state.saved
    if saved is not None and before_they_existed:
        older = {k: v for k, v in before_they_existed.items() if k in current}
        saved = {**older, **saved}
    diff = settings_diff(saved, current, keys) if saved is not None else {}
    if diff:
        raise SettingsChanged(
            f"{out} holds a different {kind} run (changed: {describe_diff(diff)}); "
            f"pass {force_flag} to start over or choose another --out",
            diff,
        )
    if state.finished:
        return Action.SKIP
    if resume is False:
        where = f" ({state.progress})" if state.progress else ""
        raise ValueError(
            f"{out} holds an unfinished run{where}; pass --resume to continue it, "
            f"{force_flag} to start over, or choose another --out"
        )
    return Action.RESUME
