"""The shared per-task tester (as segmentation_models.pytorch's ``tests/models/base.py``): one set of
checks that every task (``classify``, ``segment``, ``embed``) passes, each task a small subclass.

What every task is checked for:

* export parity: a tiny PyTorch network of the task's shape (``training.export``'s ``EmbedNet`` /
  ``ClassifyNet`` / ``SegmentNet`` around a few convolutions) exported with ``export_onnx``;
  ``check_parity`` (onnxruntime vs PyTorch at batch 1 and N), and the same on odd-sized images
  prepared as the runtime prepares them;
* batch 1 and batch N: the runtime on the stored tiny model (``tests/fixtures/tiny_models.py``)
  gives the same answer whatever its batch size;
* odd image sizes: answers of the right shape and kind for frames that are neither square nor a
  multiple of any tile;
* the service's answer: ``nanomorph serve`` (through the project's client) answers what the
  runtime answers in-process.

A subclass sets ``task`` and says how to build its tiny network, run the runtime, ask the service
and check one answer. Test classes are collected from ``tests/tasks/test_every_task.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from nanomorph.client import NanomorphClient
from nanomorph.contract import Contract
from nanomorph.store import StoredModel, resolve
from tests.fixtures.server import Server

#: Frames that are neither square nor a multiple of the tiles (sides prime or odd).
ODD_SHAPES: tuple[tuple[int, int], ...] = ((37, 53), (61, 29), (131, 97))
BATCH_N = 3


def odd_images(seed: int = 0) -> list[np.ndarray]:
    """uint8 frames of :data:`ODD_SHAPES`: noise with a bright bar (left) or a dark one (right), so
    that classes, embeddings and masks differ between them."""
    rng = np.random.default_rng(seed)
    images = []
    for i, (h, w) in enumerate(ODD_SHAPES):
        img = rng.integers(0, 40, (h, w)).astype(np.uint8) + (0 if i % 2 == 0 else 180)
        img[:, w // 3 : w // 3 + 5] = 250 if i % 2 == 0 else 10
        images.append(img.astype(np.uint8))
    return images


class TaskTester:
    """Base class: not collected itself (its name does not start with ``Test``)."""

    task: ClassVar[str]
    contract: ClassVar[Contract] = Contract(image_size=32, tile_size=64, tile_overlap=16)

    # -------------------------------------------------------------------------- per task (override)

    def torch_net(self) -> Any:
        """A tiny ``torch.nn.Module`` with the task's exported signature."""
        raise NotImplementedError

    outputs: ClassVar[list[str]]

    def model_inputs(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Each image as the runtime feeds it to the network: float32 (1, 1, H, W)."""
        raise NotImplementedError

    def local(self, stored: StoredModel, images: Sequence[np.ndarray], batch_size: int) -> list[Any]:
        """The runtime's answer per image, in a form :meth:`assert_same` compares."""
        raise NotImplementedError

    def served(self, client: NanomorphClient, images: Sequence[np.ndarray]) -> list[Any]:
        """The service's answer per image, in the same form as :meth:`local`."""
        raise NotImplementedError

    def check_answer(self, answer: Any, image: np.ndarray, stored: StoredModel) -> None:
        """Asserts that one answer is well-formed for an image of this shape."""
        raise NotImplementedError

    def assert_same(self, got: Any, want: Any) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------------------ shared checks

    def stored(self, tiny_store: tuple[Path, dict[str, str]]) -> StoredModel:
        root, tags = tiny_store
        return resolve(tags[self.task], root)

    def export_job(self, tmp_path: Path) -> Any:
        torch = pytest.importorskip("torch")
        from training.export import ExportJob

        torch.manual_seed(0)
        net = self.torch_net().eval()
        return ExportJob(
            self.task, net, list(self.outputs), self.contract, tmp_path, tmp_path / "w.safetensors"
        )

    def test_export_parity_at_batch_1_and_n(self, tmp_path: Path) -> None:
        from training.export import PARITY_BATCHES, TOLERANCE, check_parity, export_onnx

        job = self.export_job(tmp_path)
        onnx_path = export_onnx(job, tmp_path / f"{self.task}.onnx")
        report = check_parity(job, onnx_path)
        assert report["max_abs_diff"] <= TOLERANCE
        checked = {key.split()[1].split("x")[0] for key in report["checks"]}
        assert checked == {str(n) for n in PARITY_BATCHES} and min(PARITY_BATCHES) == 1

    def test_export_parity_on_odd_sized_images(self, tmp_path: Path) -> None:
        import onnxruntime as ort
        import torch

        from training.export import TOLERANCE, export_onnx

        job = self.export_job(tmp_path)
        session = ort.InferenceSession(
            str(export_onnx(job, tmp_path / f"{self.task}.onnx")), providers=["CPUExecutionProvider"]
        )
        for x in self.model_inputs(odd_images()):
            with torch.no_grad():
                ref = job.net(torch.from_numpy(np.array(x)))  # a writable copy
            refs = [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
            got = session.run(job.outputs, {"image": x})
            for r, g in zip(refs, got, strict=True):
                assert r.shape == g.shape
                assert float(np.abs(r - g).max()) <= TOLERANCE

    def test_batch_1_and_batch_n_agree(self, tiny_store: tuple[Path, dict[str, str]]) -> None:
        stored = self.stored(tiny_store)
        images = odd_images()
        one = self.local(stored, images, batch_size=1)
        many = self.local(stored, images, batch_size=BATCH_N)
        assert len(one) == len(many) == len(images)
        for a, b in zip(one, many, strict=True):
            self.assert_same(b, a)

    @pytest.mark.parametrize("index", range(len(ODD_SHAPES)))
    def test_odd_image_sizes(self, tiny_store: tuple[Path, dict[str, str]], index: int) -> None:
        stored = self.stored(tiny_store)
        image = odd_images()[index]
        (answer,) = self.local(stored, [image], batch_size=BATCH_N)
        self.check_answer(answer, image, stored)

    def test_service_answers_as_the_runtime(
        self, tiny_store: tuple[Path, dict[str, str]], default_server: Server
    ) -> None:
        stored = self.stored(tiny_store)
        images = odd_images(seed=1)
        with NanomorphClient(default_server.url, timeout=60.0) as client:
            served = self.served(client, images)
        local = self.local(stored, images, batch_size=BATCH_N)
        assert len(served) == len(local) == len(images)
        for got, want, image in zip(served, local, images, strict=True):
            self.check_answer(got, image, stored)
            self.assert_same(got, want)
