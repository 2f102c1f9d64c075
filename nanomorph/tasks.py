"""The tasks a nanomorph model does, in one table: what each exports, stores, runs and serves.

Every per-task branch reads this table instead of naming tasks itself: the model store (which
tasks exist), :mod:`nanomorph.runtime` (:func:`~nanomorph.runtime.task_helper` builds a task's
helper), the service's model loader, ``nanomorph predict`` (:class:`nanomorph.batch.pipelines.LocalBackend`)
and ``nanomorph export`` (ONNX outputs, input size, weights file, model card). A new task is one
more :class:`Task` row here plus its runtime class. Plain data: no numpy, torch or onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a type only: this table imports nothing of the project
    from nanomorph.contract import Contract


@dataclass(frozen=True)
class Task:
    """One task and everything that differs between tasks."""

    name: str
    #: ONNX output names, in the order the exported model returns them
    outputs: tuple[str, ...]
    #: the :mod:`nanomorph.runtime` class that runs it (built by ``runtime.task_helper``)
    runtime: str
    #: fully convolutional: any height/width (multiples of 32), run on tiles of the contract's
    #: ``tile_size``; otherwise one ``image_size`` square per input
    tiled: bool
    #: the training run's weights file that ``nanomorph export`` reads, and the flag naming the run
    weights: str
    export_flag: str
    #: int8 quantisation is offered (it needs labelled images to check the accuracy it costs; a kept
    #: int8 model is stored beside the fp32 one and served on CPU: nanomorph.runtime.model_file)
    quantizable: bool
    #: model card: what the model is for, and one line calling it with its runtime class
    use: str
    example: str

    def input_side(self, contract: Contract) -> int:
        """Side of the square input the model is exported, warmed up and checked with."""
        return contract.tile_size if self.tiled else contract.image_size


_ROWS = (
    Task(
        name="classify",
        outputs=("probabilities", "embedding"),
        runtime="Classifier",
        tiled=False,
        weights="classifier.safetensors",
        export_flag="--classifier",
        quantizable=True,
        use="Morphology class of a TEM image like those in the training data, with an "
        "out-of-distribution flag for images unlike them.",
        example="print(Classifier(model).predict([image])[0]['label'])",
    ),
    Task(
        name="embed",
        outputs=("embedding",),
        runtime="Embedder",
        tiled=False,
        weights="backbone.safetensors",
        export_flag="--encoder",
        quantizable=False,
        use="Embeddings of TEM images for similarity search, maps and label suggestions.",
        example="vector = Embedder(model).embed([image])[0]",
    ),
    Task(
        name="segment",
        outputs=("probabilities",),
        runtime="Segmenter",
        tiled=True,
        weights="segmenter.safetensors",
        export_flag="--segmenter",
        quantizable=True,
        use="Per-pixel classes of TEM frames like those in the training data, at native resolution.",
        example="mask = Segmenter(model).predict(image)['mask']",
    ),
)

#: task name -> its row, in the one order used everywhere (service slots, /models, export, CLI choices)
TASK_TABLE: dict[str, Task] = {t.name: t for t in _ROWS}
#: the task names: ("classify", "embed", "segment")
TASKS: tuple[str, ...] = tuple(TASK_TABLE)


def get_task(name: str) -> Task:
    """The row of task ``name``.

    Raises:
        ValueError: no such task (the message lists them).
    """
    try:
        return TASK_TABLE[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; one of {', '.join(TASKS)}") from None
