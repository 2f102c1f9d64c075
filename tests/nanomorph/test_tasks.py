"""The one task table (nanomorph.tasks) and the one class-mask dtype (nanomorph.contract.mask_dtype)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nanomorph import runtime
from nanomorph.contract import Stitcher, mask_dtype
from nanomorph.morphology import mask_to_png_bytes, png_bytes_to_mask
from nanomorph.particles import InstanceParams, fold_mask
from nanomorph.store import resolve
from nanomorph.tasks import TASK_TABLE, TASKS, get_task
from tests.fixtures.tiny_models import build_tiny_store


def test_table_names_every_task_once_in_one_order() -> None:
    assert TASKS == ("classify", "embed", "segment")
    assert [t.name for t in TASK_TABLE.values()] == list(TASKS)
    with pytest.raises(ValueError, match="classify, embed, segment"):
        get_task("detect")


def test_each_row_matches_the_models_it_describes(tiny_store: tuple[Path, dict[str, str]]) -> None:
    """The stored models' ONNX outputs are the row's, and the row's runtime class runs them."""
    root, tags = tiny_store
    for task in TASKS:
        row = get_task(task)
        onnx = runtime.OnnxModel(resolve(tags[task], str(root)))
        assert tuple(onnx.output_names) == row.outputs
        helper = runtime.task_helper(task, onnx, max_tile=None)
        assert type(helper).__name__ == row.runtime
        side = row.input_side(onnx.stored.contract)
        out = onnx.run(np.zeros((2, 1, side, side), np.float32))
        assert all(out[name].shape[0] == 2 for name in row.outputs)
    # embed runs any model with an embedding output, as before the table (a classify model too)
    classify = runtime.OnnxModel(resolve(tags["classify"], str(root)))
    assert isinstance(runtime.task_helper("embed", classify), runtime.Embedder)


@pytest.mark.parametrize(
    ("n", "dtype"), [(1, np.uint8), (256, np.uint8), (257, np.uint16), (65536, np.uint16)]
)
def test_mask_dtype_rule(n: int, dtype: type) -> None:
    assert mask_dtype(n) is dtype


def test_mask_dtype_refuses_impossible_counts() -> None:
    for n in (0, 65537):
        with pytest.raises(ValueError, match="1 to 65536"):
            mask_dtype(n)


def test_masks_above_256_classes_are_uint16_everywhere(tmp_path: Path) -> None:
    """Runtime (Stitcher and fold_mask: Segmenter.mask / .predict, and the service's tiles) and
    the PNG the service sends agree: uint16, values kept."""
    n = 300
    root = tmp_path / "store"
    tags = build_tiny_store(root, seg_classes=tuple(f"c{i}" for i in range(n)))
    seg = runtime.Segmenter(resolve(tags["segment"], str(root)))
    image = np.linspace(0, 1, 40 * 48, dtype=np.float32).reshape(40, 48)
    streamed = seg.mask(image)
    predicted = seg.predict(image)["mask"]
    assert streamed.dtype == predicted.dtype == np.uint16
    assert np.array_equal(streamed, predicted) and int(predicted.max()) > 255
    back = png_bytes_to_mask(mask_to_png_bytes(predicted))
    assert back.dtype == np.uint16 and np.array_equal(back, predicted)
    # the same rule below the line, and for a boundary model the rim channel is not counted
    probs = np.random.default_rng(0).random((256, 8, 8)).astype(np.float32)
    assert fold_mask(probs, None).dtype == np.uint8
    rim = InstanceParams.from_dict({"boundary_class": 256})
    assert fold_mask(np.random.default_rng(0).random((257, 8, 8)), rim).dtype == np.uint8
    stitcher = Stitcher((8, 8), 32, single_tile=True)
    stitcher.add(np.random.default_rng(0).random((1, 257, 32, 32)), [(0, 0)])
    assert stitcher.finish()[0].dtype == np.uint16


def test_finetune_seg_masks_follow_the_same_rule() -> None:
    torch = pytest.importorskip("torch")
    from nanomorph.contract import Contract
    from training.finetune_seg import segment_image

    net = torch.nn.Conv2d(1, 300, 1)
    mask, probs = segment_image(net, np.zeros((40, 40), np.float32), Contract(tile_size=32, tile_overlap=0))
    assert probs.shape[0] == 300 and mask.dtype == np.uint16
