"""``nanomorph map``: a 2-D map of the embeddings of a folder (:mod:`nanomorph.archive.datamap`)."""

from __future__ import annotations

import argparse

from nanomorph.cli.options import add_store


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    from nanomorph.archive.datamap import METHODS

    a = parser.add_argument
    a("input_dir", help="folder of images (a classification layout colours by class)")
    a("--out", help="PNG to write (map.csv and map.yaml beside it)")
    a("--html", help="also write a self-contained HTML map")
    add_store(parser, "model store: a folder or 'bentoml' (null: $NANOMORPH_STORE)", was_models=True)
    a("--tag", help="embed/classify model tag or stored model folder")
    a("--method", choices=METHODS, help="auto: UMAP if installed, else PCA")
    a("--max-images", type=int, help="random sample above this")
    a("--seed", type=int, help="seed of the sample and the projection")
    a("--batch-size", type=int, help="images per onnxruntime call")


def run(args: argparse.Namespace) -> int:
    from nanomorph.archive import datamap

    return datamap.run(args)
