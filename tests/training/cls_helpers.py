"""A stand-in pretrained encoder and the CLI runner for the finetune-cls / study tests (their data:
``tests.fixtures.images.write_shapes``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tests.fixtures.cli import CliResult, nanomorph

ARCH = "test_resnet"  # timm's tiny ResNet: the whole pipeline in seconds on 2 CPU cores


def write_encoder(path: Path, image_size: int = 32) -> Path:
    """A backbone file as `nanomorph pretrain` writes it (random weights: the tests check plumbing)."""
    import torch

    from nanomorph.contract import Contract
    from training.backbones import create_backbone, save_backbone

    torch.manual_seed(1)
    model = create_backbone(ARCH)
    meta = {
        "architecture": ARCH,
        "in_chans": 1,
        "method": "simclr",
        "image_size": image_size,
        "contract": Contract(image_size=image_size).to_json(),
        "epochs": 0,
        "embedding_dim": int(model.num_features),  # type: ignore[arg-type]
    }
    return save_backbone(model, path, meta)


def one_thread() -> Iterator[None]:
    """Fixture body: torch on one thread. These models are tiny, and on a shared busy machine the
    intra-op thread pool's hand-offs made them ~10x slower (measured)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cli(*args: str) -> CliResult:
    """``nanomorph ARGS...`` offline with plain progress lines (the one runner, tests.fixtures.cli)."""
    return nanomorph(*args, env={"HF_HUB_OFFLINE": "1", "NANOMORPH_PLAIN_PROGRESS": "1"})
