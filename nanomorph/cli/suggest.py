"""``nanomorph suggest``: which images to label next (:mod:`nanomorph.archive.suggest`)."""

from __future__ import annotations

import argparse

from nanomorph.cli.options import add_store


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    from nanomorph.archive.suggest import STRATEGIES, UNCERTAINTY

    a = parser.add_argument
    a("--unlabeled", required=True, help="folder of candidate images")
    a("--labeled", help="folder of images labeled already (any layout)")
    a("-n", type=int, help="how many to suggest")
    a(
        "--strategy",
        choices=STRATEGIES,
        help="diversity: k-center coverage of the embeddings; uncertainty: least sure classifier "
        "predictions; hybrid: coverage among the most uncertain (the last two need --classifier)",
    )
    a("--out", required=True, help="output folder")
    a(
        "--encoder",
        help="exported embed model: tag in --store, or a stored model folder; a training run folder "
        "must be exported first (nanomorph export RUN)",
    )
    a("--classifier", help="stored classify model (tag in --store, or its folder) for uncertainty")
    a("--uncertainty", choices=UNCERTAINTY, help="uncertainty score of a prediction")
    a("--pool-factor", type=int, help="hybrid: candidate pool = factor x n")
    add_store(parser, "model store: a folder or 'bentoml' (null: $NANOMORPH_STORE)", was_models=True)
    a("--batch-size", type=int, help="images per onnxruntime call")


def run(args: argparse.Namespace) -> int:
    from nanomorph.archive import suggest

    return suggest.run(args)
