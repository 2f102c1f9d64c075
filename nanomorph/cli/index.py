"""``nanomorph index build|query``: similar-image search (:mod:`nanomorph.archive.index`)."""

from __future__ import annotations

import argparse

from nanomorph.cli.options import add_store


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.description = (
        "Similar-image search. Exact cosine search with numpy: the index holds N x D x 4 bytes "
        "(1M images x 512-d = 2 GB) and is fine up to ~1M images; beyond, load vectors.npy into "
        "faiss (HNSW / IVF-PQ)."
    )
    a = parser.add_argument
    # One flat parser (not subparsers), so a --config file can set any option.
    a("action", choices=("build", "query"), help="build an index / query it")
    a("path", help="build: folder of images (searched recursively); query: an image file")
    a("--out", help="build: the index folder to write or resume")
    a("--index", help="query: the index folder")
    add_store(
        parser,
        "model store: a folder or 'bentoml' (build null: $NANOMORPH_STORE; query null: the store the "
        "index records)",
        was_models=True,
    )
    a("--tag", help="build: embed (or classify) model tag, or a stored model folder")
    a("--batch-size", type=int, help="images per onnxruntime call")
    a("--chunk", type=int, help="build: images per saved chunk (resume unit)")
    a("--no-recursive", action="store_true", help="build: top folder only")
    a("-k", type=int, help="query: neighbours")
    a("--json", action="store_true", help="query: print JSON")


def run(args: argparse.Namespace) -> int:
    from nanomorph.archive import index

    return index.run(args)
