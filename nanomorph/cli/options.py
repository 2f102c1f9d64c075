"""Option plumbing shared by every command: YAML defaults, ``--config FILE``, help that shows each
default, the shared ``--store`` / ``--force`` / ``--resume`` flags and their deprecated spellings.

The packaged YAML (``nanomorph/configs/<command>.yaml``, ``training/configs/<command>.yaml``) is the
only source of defaults: the command modules declare flags without defaults and
:func:`apply_yaml_defaults` sets them (``parser.set_defaults``, as timm's ``train.py`` does).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from nanomorph.config import load_yaml, yaml_defaults

#: Old spellings kept for one release: old dest -> (new dest, new flag).
DEPRECATED: dict[str, tuple[str, str]] = {
    "models": ("store", "--store"),
    "overwrite": ("force", "--force"),
}


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to every option's help, so ``--help`` shows the YAML defaults."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "%(default)" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".strip()


def command_parser(name: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=f"nanomorph {name}", description=description, formatter_class=DefaultsFormatter
    )


def option_dests(parser: argparse.ArgumentParser) -> set[str]:
    """Dests of the options that take a default (no positionals, --help, hidden deprecated aliases)."""
    return {
        a.dest
        for a in parser._actions
        if a.option_strings and a.help is not argparse.SUPPRESS and not a.required
        and a.dest not in ("help", "config")
    }  # fmt: skip


def apply_yaml_defaults(parser: argparse.ArgumentParser, command: str) -> dict[str, Any]:
    """Sets the command's packaged YAML values as the parser's defaults; returns them.

    Raises:
        ValueError: a YAML key names no option (each key must have a flag).
    """
    defaults = yaml_defaults(command)
    unknown = sorted(set(defaults) - option_dests(parser))
    if unknown:
        raise ValueError(f"configs/{command}.yaml: key(s) without a flag: {', '.join(unknown)}")
    parser.set_defaults(**defaults)
    return defaults


def apply_config_file(parser: argparse.ArgumentParser, argv: Iterable[str]) -> None:
    """Adds ``--config FILE.yaml`` to ``parser`` and, when given in ``argv``, makes its values the
    parser's defaults, so flags on the command line still win."""
    if not any(a.dest == "config" for a in parser._actions):
        parser.add_argument("--config", default=None, help="YAML file of option values (flags override it)")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(list(argv))
    if not known.config:
        return
    values = load_yaml(known.config)
    for old, (new, flag) in DEPRECATED.items():
        if old in values and new in {a.dest for a in parser._actions}:
            _warn(parser.prog, f"{known.config}: '{old}' is deprecated, use '{flag.lstrip('-')}'")
            values.setdefault(new, values.pop(old))
    unknown = sorted(set(values) - {a.dest for a in parser._actions} - {"command"})
    if unknown:
        raise SystemExit(f"{parser.prog}: error: {known.config}: unknown option(s) {', '.join(unknown)}")
    parser.set_defaults(**values)


# ------------------------------------------------------------------------- shared flags and aliases


def _warn(prog: str, message: str) -> None:
    # DeprecationWarning is hidden by default outside __main__, so users also get a stderr line.
    warnings.warn(message, DeprecationWarning, stacklevel=3)
    print(f"{prog}: warning: {message}; the old spelling goes in the next release", file=sys.stderr)


class _DeprecatedAlias(argparse.Action):
    """An old option spelling: stores into the new dest and warns once used."""

    def __init__(self, option_strings: Sequence[str], dest: str, new_flag: str = "", **kwargs: Any) -> None:
        self.new_flag = new_flag
        super().__init__(option_strings, dest, **kwargs)

    def __call__(
        self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        _warn(parser.prog, f"{option} is deprecated, use {self.new_flag}")
        setattr(ns, self.dest, self.const if self.nargs == 0 else values)


def add_store(parser: argparse.ArgumentParser, help_: str, *, was_models: bool = False) -> None:
    """``--store`` (a folder or 'bentoml'); ``was_models``: also the deprecated ``--models`` spelling
    (predict, watch, index, map and suggest called it that)."""
    parser.add_argument("--store", help=help_)
    if was_models:
        parser.add_argument(
            "--models", dest="store", action=_DeprecatedAlias, new_flag="--store", help=argparse.SUPPRESS
        )


def add_run_policy(parser: argparse.ArgumentParser, force_help: str, resume_help: str | None) -> None:
    """``--force`` (start over) and ``--resume`` of every run-producing command (dests ``force``,
    ``resume``; no ``--resume`` where there is nothing to resume), plus ``--overwrite``, the
    deprecated spelling of ``--force``."""
    parser.add_argument("--force", action="store_true", help=force_help)
    if resume_help:
        parser.add_argument("--resume", action="store_true", help=resume_help)
    parser.add_argument(
        "--overwrite",
        dest="force",
        action=_DeprecatedAlias,
        nargs=0,
        const=True,
        new_flag="--force",
        help=argparse.SUPPRESS,
    )


def yes_no(value: str) -> bool:
    """``true``/``false`` (and 1/0, yes/no, on/off) as a flag value."""
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def auto_or_bool(value: str) -> str | bool:
    """``auto``, or true/false, as a flag value."""
    return "auto" if value.lower() == "auto" else yes_no(value)


def float_list(value: str) -> list[float]:
    """``0.001,0.01,0.1`` as a flag value."""
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None


class Repeatable(argparse.Action):
    """A repeatable option whose command-line values replace (not extend) its default."""

    def __call__(
        self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        current = getattr(ns, self.dest, None)
        items = [] if current is self.default or not isinstance(current, list) else current
        setattr(ns, self.dest, [*items, values])
