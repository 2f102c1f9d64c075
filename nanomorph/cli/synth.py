"""``nanomorph synth``: synthetic TEM images with exact masks (:mod:`nanomorph.synth`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    from nanomorph.synth import CLASSES, FORMATS

    a = parser.add_argument
    a("--out", type=Path, help="output folder (the data set root; required)")
    a("--kind", choices=sorted(CLASSES), help="specimen kind")
    a("--n-per-class", type=int, help="labeled images per class")
    a("--n-unlabeled", type=int, help="unlabeled images (separate renders); null: n-per-class x classes")
    a("--size", type=int, help="image side in pixels")
    a("--seed", type=int, help="master seed (same seed, same bytes)")
    a("--format", dest="format", choices=FORMATS, help="png (8-bit) or tiff16")
    a("--pixel-size", dest="pixel_size", type=float, help="pixel size in nm (written into tiff16 metadata)")
    a("--contact-sheet", action=argparse.BooleanOptionalAction, help="write contact_sheet.png")


def run(args: argparse.Namespace) -> int:
    from nanomorph import synth

    return synth.run(args)
