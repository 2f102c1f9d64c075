"""``nanomorph merge``: join the outputs of ``predict --shard I/N`` runs (:mod:`nanomorph.batch.shards`)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("out", help="the --out folder of the `predict --shard I/N` runs")
    parser.add_argument("--into", help="write the merged results here (null: OUT itself)")
    parser.add_argument(
        "--partial", action="store_true", help="merge what is there even if shards are missing or unfinished"
    )


def run(args: argparse.Namespace) -> int:
    from nanomorph.batch import shards

    return shards.run(args)
