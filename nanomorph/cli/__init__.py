"""The `nanomorph` console script.

Subcommands follow the pipeline. Each is a module of this package exposing
``add_arguments(parser, name)`` and ``run(args) -> int``; argparse code lives only here. A command's
module is imported only when used, and imports its library module (torch for training) only inside
``run``, so ``nanomorph --help`` and ``nanomorph <command> --help`` never import torch.

Defaults: the packaged YAML (``configs/<command>.yaml``) via ``set_defaults``, then ``--config FILE``,
then command-line flags (:mod:`nanomorph.cli.options`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

from nanomorph import __version__
from nanomorph.cli.options import apply_config_file, apply_yaml_defaults, command_parser

# name -> (module in nanomorph.cli, one-line help). Order is the pipeline's order.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("synth", "generate synthetic TEM images with exact masks"),
    "pretrain": ("pretrain", "self-supervised pretraining (SimCLR / Barlow Twins)"),
    "finetune-cls": ("finetune_cls", "few-label classification (linear probe / LP-FT)"),
    "finetune-seg": ("finetune_seg", "few-label segmentation (U-Net on the pretrained encoder)"),
    "study": ("study", "label-efficiency study (classification or segmentation)"),
    "export": ("export", "export runs to ONNX and store them"),
    "models": ("models", "list stored models"),
    "demo": ("demo", "build the default model from synthetic data (used by `make serve`)"),
    "serve": ("serve", "serve stored models over HTTP (BentoML)"),
    "predict": ("batch", "offline batch prediction over a folder (no server)"),
    "client": ("batch", "batch prediction over a folder through a running server"),
    "watch": ("batch", "watched-folder mode for acquisition"),
    "merge": ("merge", "merge the outputs of `predict --shard I/N` runs"),
    "index": ("index", "similar-image search index (build / query)"),
    "suggest": ("suggest", "which images to label next (active learning)"),
    "map": ("map", "2-D map of the embeddings of a folder"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanomorph",
        description="Self-supervised TEM image analysis: pretrain, transfer, export, serve.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<14}{help_}" for name, (_, help_) in COMMANDS.items()),
    )
    parser.add_argument("--version", action="version", version=f"nanomorph {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "command", choices=list(COMMANDS), metavar="command", help="one of the commands below"
    )
    return parser


def command_module(name: str) -> Any:
    return importlib.import_module(f"nanomorph.cli.{COMMANDS[name][0]}")


def build_parser(name: str) -> argparse.ArgumentParser:
    """The parser of command ``name`` with its packaged YAML defaults (no ``--config`` applied)."""
    parser = command_parser(name, COMMANDS[name][1])
    command_module(name).add_arguments(parser, name)
    apply_yaml_defaults(parser, name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    # Split at the command name so that the command's own flags are parsed by its own parser.
    split = next((i for i, a in enumerate(argv) if a in COMMANDS), None)
    if split is None:
        top.parse_args(argv)  # prints help / the error about a missing or unknown command
        return 2
    top_args = top.parse_args(argv[: split + 1])
    logging.basicConfig(
        level=logging.DEBUG if top_args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    name = top_args.command
    parser = build_parser(name)
    rest = argv[split + 1 :]
    apply_config_file(parser, rest)
    args = parser.parse_args(rest)
    args.command = name
    try:
        return int(command_module(name).run(args) or 0)
    except ImportError as exc:  # e.g. the training extra is not installed
        if top_args.verbose:
            raise
        print(
            f"nanomorph {name}: cannot import {exc.name or 'a module'} ({exc}); "
            f"install the extra it needs, e.g. pip install 'nanomorph[training]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"nanomorph {name}: interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        # User errors (bad paths, bad files, bad options) end with one clear line, not a traceback.
        if top_args.verbose:
            raise
        print(f"nanomorph {name}: error: {exc}", file=sys.stderr)
        return 2
