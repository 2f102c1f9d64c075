"""Every task through the shared per-task tester (tests/tasks/base.py): export parity with PyTorch at
batch 1 and N and on odd sizes, runtime batch 1 == batch N, odd image sizes, the service's answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pytest

from nanomorph.client import NanomorphClient
from nanomorph.contract import normalise, to_model_input
from nanomorph.runtime import Classifier, Embedder, Segmenter
from nanomorph.store import StoredModel
from tests.tasks.base import BATCH_N, TaskTester

N_FEATURES = 4


def tiny_backbone() -> Any:
    """A few convolutions + global pooling with ``num_features``, as timm backbones have."""
    from torch import nn

    backbone = nn.Sequential(
        nn.Conv2d(1, N_FEATURES, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(N_FEATURES, N_FEATURES, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    backbone.num_features = N_FEATURES  # type: ignore[assignment]
    return backbone


def whole_image_inputs(images: Sequence[np.ndarray], contract: Any) -> list[np.ndarray]:
    """Classify / embed: each image normalised and resized to the contract's square input."""
    return [to_model_input(img, contract)[None] for img in images]


class TestClassify(TaskTester):
    task = "classify"
    outputs: ClassVar[list[str]] = ["probabilities", "embedding"]

    def torch_net(self) -> Any:
        from training.export import ClassifyNet
        from training.models import Classifier as TorchClassifier

        return ClassifyNet(TorchClassifier(tiny_backbone(), 3))

    def model_inputs(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        return whole_image_inputs(images, self.contract)

    def local(self, stored: StoredModel, images: Sequence[np.ndarray], batch_size: int) -> list[Any]:
        return Classifier(stored, batch_size=batch_size).predict(list(images))

    def served(self, client: NanomorphClient, images: Sequence[np.ndarray]) -> list[Any]:
        return client.classify(list(images), batch_size=BATCH_N)

    def check_answer(self, answer: Any, image: np.ndarray, stored: StoredModel) -> None:
        assert answer["label"] in stored.classes and set(answer["probabilities"]) == set(stored.classes)
        assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert answer["confidence"] == pytest.approx(max(answer["probabilities"].values()))
        assert answer["probabilities"][answer["label"]] == answer["confidence"]

    def assert_same(self, got: Any, want: Any) -> None:
        assert got["label"] == want["label"]
        for name, p in want["probabilities"].items():
            assert got["probabilities"][name] == pytest.approx(p, abs=1e-5)
        assert got["ood_flag"] == want["ood_flag"]
        assert got["ood_score"] == pytest.approx(want["ood_score"], abs=1e-5)


class TestEmbed(TaskTester):
    task = "embed"
    outputs: ClassVar[list[str]] = ["embedding"]

    def torch_net(self) -> Any:
        from training.export import EmbedNet

        return EmbedNet(tiny_backbone())

    def model_inputs(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        return whole_image_inputs(images, self.contract)

    def local(self, stored: StoredModel, images: Sequence[np.ndarray], batch_size: int) -> list[Any]:
        return list(Embedder(stored, batch_size=batch_size).embed(list(images)))

    def served(self, client: NanomorphClient, images: Sequence[np.ndarray]) -> list[Any]:
        return [r["embedding"] for r in client.embed(list(images), batch_size=BATCH_N)]

    def check_answer(self, answer: Any, image: np.ndarray, stored: StoredModel) -> None:
        assert answer.shape == (N_FEATURES,) and answer.dtype == np.float32
        assert float(np.linalg.norm(answer)) == pytest.approx(1.0, abs=1e-5)

    def assert_same(self, got: Any, want: Any) -> None:
        np.testing.assert_allclose(got, want, atol=1e-5)


class TestSegment(TaskTester):
    task = "segment"
    outputs: ClassVar[list[str]] = ["probabilities"]

    def torch_net(self) -> Any:
        from torch import nn

        from training.export import SegmentNet

        # Fully convolutional, as the U-Net: any height and width.
        unet = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
        return SegmentNet(unet)

    def model_inputs(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        # The whole frame at its own (odd) size, normalised as the runtime does before tiling.
        return [normalise(img.astype(np.float32), self.contract)[None, None] for img in images]

    def local(self, stored: StoredModel, images: Sequence[np.ndarray], batch_size: int) -> list[Any]:
        segmenter = Segmenter(stored, batch_size=batch_size)
        return [segmenter.predict(img)["mask"] for img in images]

    def served(self, client: NanomorphClient, images: Sequence[np.ndarray]) -> list[Any]:
        return [client.segment(img)["mask"] for img in images]

    def check_answer(self, answer: Any, image: np.ndarray, stored: StoredModel) -> None:
        assert answer.shape == image.shape and np.issubdtype(answer.dtype, np.integer)
        assert set(np.unique(answer)) <= set(range(len(stored.classes)))

    def assert_same(self, got: Any, want: Any) -> None:
        np.testing.assert_array_equal(got, want)


def test_every_stored_task_has_a_tester() -> None:
    """A new task gets its subclass here, so it cannot skip the shared checks."""
    from nanomorph.store import TASKS

    assert {tester.task for tester in TaskTester.__subclasses__()} == set(TASKS)
