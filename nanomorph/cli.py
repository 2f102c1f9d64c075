"""The `nanomorph` console script.

Subcommands follow the pipeline. Each is a module exposing ``add_arguments(parser)`` and
``run(args) -> int``; it is imported only when used, so ``nanomorph --help``, the client and the
pipelines never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from nanomorph import __version__
from nanomorph.config import apply_config_file

# name -> (module, one-line help). Order is the pipeline's order.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("nanomorph.synth", "generate synthetic TEM images with exact masks"),
    "pretrain": ("training.pretrain", "self-supervised pretraining (SimCLR / Barlow Twins)"),
    "finetune-cls": ("training.finetune_cls", "few-label classification (linear probe / LP-FT)"),
    "finetune-seg": ("training.finetune_seg", "few-label segmentation (U-Net on the pretrained encoder)"),
    "study": ("training.study", "label-efficiency study (classification or segmentation)"),
    "export": ("training.export", "export runs to ONNX and store them"),
    "models": ("nanomorph.store", "list stored models"),
    "demo": ("training.demo", "build the default model from synthetic data (used by `make serve`)"),
    "serve": ("nanomorph.serve", "serve stored models over HTTP (BentoML)"),
    "predict": ("nanomorph.pipelines", "offline batch prediction over a folder (no server)"),
    "client": ("nanomorph.pipelines", "batch prediction over a folder through a running server"),
    "watch": ("nanomorph.pipelines", "watched-folder mode for acquisition"),
    "merge": ("nanomorph.shards", "merge the outputs of `predict --shard I/N` runs"),
    "index": ("nanomorph.index", "similar-image search index (build / query)"),
    "suggest": ("nanomorph.suggest", "which images to label next (active learning)"),
    "map": ("nanomorph.datamap", "2-D map of the embeddings of a folder"),
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
    module_name, help_ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # e.g. the training extra is not installed
        print(
            f"nanomorph {name}: cannot import {module_name} ({exc}); "
            f"install the extra it needs, e.g. pip install 'nanomorph[training]'",
            file=sys.stderr,
        )
        return 2
    parser = argparse.ArgumentParser(prog=f"nanomorph {name}", description=help_)
    # One module may serve several commands (predict/client/watch): it gets the name.
    add = module.add_arguments
    run = module.run
    if getattr(module, "MULTI_COMMAND", False):
        add(parser, name)
    else:
        add(parser)
    rest = argv[split + 1 :]
    apply_config_file(parser, rest)
    args = parser.parse_args(rest)
    args.command = name
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        print(f"nanomorph {name}: interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        # User errors (bad paths, bad files, bad options) end with one clear line, not a traceback.
        if top_args.verbose:
            raise
        print(f"nanomorph {name}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
