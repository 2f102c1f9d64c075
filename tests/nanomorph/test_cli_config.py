"""The one config path of every command: the packaged YAML is the only source of defaults, every
YAML key has a flag and every optional flag a YAML key, ``--help`` shows each default, ``--config``
and flags override in that order, and the old flag spellings still work with a warning."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nanomorph.cli import COMMANDS, build_parser
from nanomorph.cli.options import apply_config_file, option_dests
from nanomorph.config import to_plain, yaml_defaults

REPO = Path(__file__).resolve().parents[2]


def _minimal_argv(parser: argparse.ArgumentParser) -> list[str]:
    """Values for the positionals and required options only, so every other option keeps its default."""
    argv: list[str] = []
    for action in parser._actions:
        value = str(next(iter(action.choices))) if action.choices else "x"
        if not action.option_strings:
            argv.append(value)
        elif action.required:
            argv += [action.option_strings[0], value]
    return argv


def _action(parser: argparse.ArgumentParser, dest: str) -> argparse.Action:
    visible = [a for a in parser._actions if a.dest == dest and a.help is not argparse.SUPPRESS]
    assert len(visible) == 1, dest
    return visible[0]


def _help_of(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    formatter.add_argument(action)
    return " ".join(formatter.format_help().split())


@pytest.mark.parametrize("name", list(COMMANDS))
def test_yaml_is_the_only_source_of_defaults(name: str) -> None:
    parser = build_parser(name)
    defaults = yaml_defaults(name)
    assert defaults, f"configs/{name}.yaml is missing or empty"
    # Every YAML key has a flag, and every optional flag takes its default from the YAML.
    assert set(defaults) == option_dests(parser)
    # No flags: exactly the YAML values.
    args = parser.parse_args(_minimal_argv(parser))
    assert {k: to_plain(getattr(args, k)) for k in defaults} == defaults
    # --help shows each default.
    for key, value in defaults.items():
        assert f"(default: {value})" in _help_of(parser, _action(parser, key)), key


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_of_every_command(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        build_parser(name).parse_args(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: nanomorph {name}") and "(default: " in out
    # Old spellings still parse but are not advertised (neither in the usage nor as an option).
    assert not re.search(r"^  --(models|overwrite)\b|\[--(models|overwrite)\b", out, re.MULTILINE)


def test_help_never_imports_torch() -> None:
    code = (
        "import sys\n"
        "from nanomorph.cli import COMMANDS, main\n"
        "for argv in [['--help'], *[[name, '--help'] for name in COMMANDS]]:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'training', 'bentoml', 'onnxruntime')]\n"
        "sys.exit(f'imported {sorted(heavy)[:5]}' if heavy else 0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]


def test_config_file_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"batch_size": 7, "chunk": 9}))
    parser = build_parser("index")
    argv = ["build", "imgs", "--config", str(config), "--chunk", "3"]
    apply_config_file(parser, argv)
    args = parser.parse_args(argv)
    assert (args.batch_size, args.chunk, args.k) == (7, 3, yaml_defaults("index")["k"])


def test_config_file_unknown_key_refused(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("no_such_option: 1\n")
    with pytest.raises(SystemExit, match="no_such_option"):
        apply_config_file(build_parser("map"), ["--config", str(config)])


def test_keys_without_a_flag_before_now_have_one() -> None:
    args = build_parser("finetune-cls").parse_args(
        [
            "--weight-decay",
            "0.5",
            "--linear-iters",
            "7",
            "--freeze-bn",
            "false",
            "--linear-weight-decays",
            "0.1,1",
        ]
    )
    assert (args.weight_decay, args.linear_iters, args.freeze_bn) == (0.5, 7, False)
    assert args.linear_weight_decays == [0.1, 1.0]


# ------------------------------------------------------------------------------ one name per concept


@pytest.mark.parametrize("name", ["predict", "watch", "index", "map", "suggest"])
def test_models_is_a_deprecated_spelling_of_store(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser(name)
    argv = _minimal_argv(parser)
    assert parser.parse_args([*argv, "--store", "S1"]).store == "S1"
    assert "deprecated" not in capsys.readouterr().err
    with pytest.warns(DeprecationWarning, match="--store"):
        assert parser.parse_args([*argv, "--models", "S2"]).store == "S2"
    assert "--models is deprecated, use --store" in capsys.readouterr().err


def test_overwrite_is_a_deprecated_spelling_of_force(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser("finetune-seg")
    assert parser.parse_args([]).force is False
    with pytest.warns(DeprecationWarning, match="--force"):
        assert parser.parse_args(["--overwrite"]).force is True
    assert "--overwrite is deprecated, use --force" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "argv", "old", "new", "value"),
    [("map", ["imgs"], "models", "store", "/my/store"), ("finetune-seg", [], "overwrite", "force", True)],
)
def test_old_keys_in_a_config_file(
    name: str,
    argv: list[str],
    old: str,
    new: str,
    value: object,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({old: value}))
    parser = build_parser(name)
    with pytest.warns(DeprecationWarning):
        apply_config_file(parser, ["--config", str(config)])
    assert getattr(parser.parse_args(argv), new) == value
    assert f"'{old}' is deprecated, use '{new}'" in capsys.readouterr().err


def test_old_spelling_through_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nanomorph.cli import main

    # The warning comes first; then the command runs (and here stops at its own check).
    assert main(["index", "query", str(tmp_path / "q.png"), "--models", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--models is deprecated, use --store" in err and "needs --index" in err


def test_run_policy_flags_are_uniform() -> None:
    for name in ("pretrain", "finetune-cls", "finetune-seg", "export"):
        dests = option_dests(build_parser(name))
        assert "force" in dests, name
        # --resume only where resuming must be asked for: finetune-seg resumes by itself, finetune-cls
        # keeps no checkpoint, an export has no run folder (training.runs).
        assert ("resume" in dests) == (name == "pretrain"), name
    for name in ("predict", "watch", "index", "map", "suggest", "export", "serve", "models", "demo"):
        assert "store" in option_dests(build_parser(name)) and "models" not in option_dests(
            build_parser(name)
        )


def test_pretrain_choices_match_the_library() -> None:
    pytest.importorskip("torch")
    from nanomorph.cli import pretrain as cli_pretrain
    from training.pretrain import OPTIMIZER_DEFAULTS
    from training.ssl import PRESETS

    assert tuple(sorted(PRESETS)) == cli_pretrain.PRESETS
    assert tuple(sorted(OPTIMIZER_DEFAULTS)) == cli_pretrain.OPTIMIZERS
