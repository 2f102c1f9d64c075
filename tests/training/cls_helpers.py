"""Tiny classification data and a stand-in pretrained encoder for the finetune-cls / study tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
NANOMORPH = str(Path(sys.executable).parent / "nanomorph")
ARCH = "test_resnet"  # timm's tiny ResNet: the whole pipeline in seconds on 2 CPU cores
CLASSES = ("bar", "disk", "ring")  # sorted: the class index order


def write_shapes(root: Path, n_per_class: int = 8, size: int = 40, seed: int = 0) -> Path:
    """Noisy grayscale PNGs of a bar (random orientation), a disk or a ring, one folder per class.

    Classes are rotation-invariant, as TEM morphology classes are (fine-tuning augments with
    flips and 90-degree rotations)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for cls in CLASSES:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
            r2 = (yy - cy) ** 2 + (xx - cx) ** 2
            if cls == "disk":
                mask = r2 < (size // 5) ** 2
            elif cls == "ring":
                mask = (r2 < (size // 4) ** 2) & (r2 >= (size // 4 - 3) ** 2)
            elif i % 2:
                mask = (abs(yy - cy) < 3) & (abs(xx - cx) < size // 3)
            else:
                mask = (abs(xx - cx) < 3) & (abs(yy - cy) < size // 3)
            img = 60 + 120 * mask + rng.normal(0, 12, mask.shape)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / cls / f"{cls}_{i:02d}.png")
    return root


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


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NANOMORPH_PLAIN_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [NANOMORPH, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO, check=False
    )
