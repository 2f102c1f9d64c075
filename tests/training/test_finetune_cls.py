"""`nanomorph finetune-cls` end to end on tiny generated data (subprocess CLI, real files)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from tests.fixtures.cli import nanomorph
from tests.fixtures.images import SHAPE_CLASSES as CLASSES
from tests.fixtures.images import write_shapes
from tests.training.cls_helpers import ARCH, cli, one_thread, write_encoder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True, scope="module")
def _torch_one_thread() -> Iterator[None]:
    yield from one_thread()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("cls") / "classification")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_encoder(tmp_path_factory.mktemp("pre") / "backbone.safetensors")


def _check_metrics(m: dict) -> None:
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert 0.0 <= m[key] <= 1.0
    for c in CLASSES:
        assert 0.0 <= m["per_class"][c]["precision"] <= 1.0
        assert 0.0 <= m["per_class"][c]["recall"] <= 1.0
    assert np.asarray(m["confusion_matrix"]).sum() == m["n_test"]


def test_linear_probe_writes_the_run_folder_and_skips_a_rerun(
    data: Path, encoder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = ["finetune-cls", "--encoder", str(encoder.parent), "--data", str(data), "--mode", "linear",
            "--labels-per-class", "4", "--seed", "3", "--out", str(out)]  # fmt: skip
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    for name in ("config.yaml", "metrics.json", "classifier.safetensors", "classes.json", "ood.json",
                 "confusion_matrix.png", "README.md"):  # fmt: skip
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    _check_metrics(m)
    # 8 images per class: round(0.3*8)=2 to test, 4 labeled (1 of them validation) per class
    assert (m["n_train"], m["n_val"], m["n_test"]) == (9, 3, 6)
    assert m["label_counts"]["train"] == {c: 3 for c in CLASSES}
    assert m["image_size"] == 32 and m["mode"] == "linear"
    assert json.loads((out / "classes.json").read_text()) == list(CLASSES)

    ood = json.loads((out / "ood.json").read_text())
    cents = np.asarray(ood["centroids"])
    assert ood["metric"] == "cosine" and cents.shape[0] == 3
    np.testing.assert_allclose(np.linalg.norm(cents, axis=1), 1.0, atol=1e-5)
    assert 0.0 <= ood["threshold"] <= 2.0

    with safe_open(str(out / "classifier.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
        keys = list(fh.keys())
    assert {k.split(".")[0] for k in keys} == {"backbone", "head"}
    assert json.loads(meta["classes"]) == list(CLASSES)
    assert meta["architecture"] == ARCH and meta["mode"] == "linear"
    assert json.loads(meta["contract"])["image_size"] == 32
    assert meta["encoder_source"].endswith("backbone.safetensors")

    # The saved classifier reproduces the reported test accuracy through the contract's preprocessing.
    import torch
    from safetensors.torch import load_file

    from nanomorph.contract import Contract, read_image, to_model_input
    from training.backbones import create_backbone
    from training.finetune_cls import list_labeled
    from training.models import Classifier
    from training.splits import make_split

    model = Classifier(create_backbone(ARCH), 3)
    model.load_state_dict(load_file(str(out / "classifier.safetensors")), strict=True)
    contract = Contract.from_json(meta["contract"])
    paths, labels, _ = list_labeled(data)
    split = make_split(labels, 4, 0.2, 0.3, seed=3, class_names=list(CLASSES))
    x = np.stack([to_model_input(read_image(paths[i])[0], contract) for i in split.test])
    with torch.no_grad():
        pred = model.eval()(torch.from_numpy(x)).argmax(1).numpy()
    assert (pred == np.asarray(labels)[split.test]).mean() == pytest.approx(m["accuracy"])

    # A rerun with the same settings does nothing; other settings into the same folder are refused.
    stamp = os.stat(out / "metrics.json").st_mtime_ns
    assert nanomorph(*args).returncode == 0 and os.stat(out / "metrics.json").st_mtime_ns == stamp
    refused = nanomorph(*args[:-2], "--mode", "finetune", "--out", str(out))
    assert refused.returncode == 2
    assert "different finished run" in refused.stderr


def test_finetune_from_scratch_lp_ft(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    proc = cli("finetune-cls", "--encoder", "scratch", "--arch", ARCH, "--image-size", "32", "--data", str(data),
               "--mode", "finetune", "--labels-per-class", "all", "--scratch-steps", "12", "--eval-every", "4",
               "--batch-size", "8", "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "metrics.json").read_text())
    _check_metrics(m)
    ft = m["finetune"]
    assert ft["steps"] == 12 and ft["frozen_batchnorm"] is False  # scratch trains its BatchNorm
    # the linear-probe state (step 0) is a selection candidate: never worse than the probe on validation
    steps = [h["step"] for h in ft["history"]]
    assert steps[0] == 0 and steps[-1] == 12
    best = max(h["balanced_accuracy"] for h in ft["history"])
    assert m["val"]["balanced_accuracy"] == pytest.approx(best)
    assert m["val"]["balanced_accuracy"] >= ft["history"][0]["balanced_accuracy"]
    assert m["selection"].startswith("val_balanced_accuracy")
    assert (out / "config.yaml").read_text().count("mode: finetune") == 1


def test_one_label_per_class_has_no_validation(data: Path, encoder: Path) -> None:
    from training.finetune_cls import train_classifier

    m = train_classifier(
        {
            "encoder": str(encoder),
            "data": str(data),
            "mode": "finetune",
            "labels_per_class": 1,
            "steps": 3,
            "eval_every": 1,
            "out": None,
        },  # fmt: skip
        show_progress=False,
    )
    assert (m["n_train"], m["n_val"]) == (3, 0) and m["val"] is None
    assert "no validation labels" in m["selection"] and "no validation labels" in m["linear"]["selection"]
    assert m["finetune"]["frozen_batchnorm"] is True  # pretrained: BatchNorm statistics kept


def test_group_column_keeps_groups_out_of_the_test_split(data: Path, encoder: Path, tmp_path: Path) -> None:
    from training.finetune_cls import load_images, resolve_encoder
    from training.splits import make_split

    # labels.csv with a group column (paths absolute: they are joined to the csv's folder)
    rows = ["path,label,tile"]
    for c in CLASSES:
        rows += [f"{p},{c},t{int(p.stem[-2:]) % 4}" for p in sorted((data / c).glob("*.png"))]
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    (csv_dir / "labels.csv").write_text("\n".join(rows) + "\n")
    images = load_images(
        csv_dir, resolve_encoder(str(encoder)).contract, group_column="tile", show_progress=False
    )
    assert images.groups is not None and set(images.groups) == {"t0", "t1", "t2", "t3"}
    split = make_split(
        images.labels, 2, 0.2, 0.3, seed=0, groups=images.groups, class_names=images.class_names
    )
    assert not set(images.groups[split.test]) & set(images.groups[np.concatenate([split.train, split.val])])
    with pytest.raises(ValueError, match="no column 'source'"):
        load_images(csv_dir, resolve_encoder(str(encoder)).contract, group_column="source")


def test_bad_input_gives_one_clear_line(data: Path, encoder: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "bad")
    run = nanomorph("finetune-cls", "--encoder", str(encoder), "--data", str(data), "--labels-per-class", "7",
                    "--out", out)  # fmt: skip
    code, err = run.returncode, run.stderr
    assert code == 2 and "class 'bar' has only 6 image(s) outside the test split" in err
    assert "Traceback" not in err

    empty = tmp_path / "empty_class"
    write_shapes(empty, n_per_class=3)
    (empty / "rods").mkdir()
    run = nanomorph("finetune-cls", "--encoder", str(encoder), "--data", str(empty), "--out", out)
    assert run.returncode == 2 and "class folder 'rods' has 0 images" in run.stderr

    run = nanomorph(
        "finetune-cls", "--encoder", tmp_path / "nope.safetensors", "--data", str(data), "--out", out
    )
    assert run.returncode == 2 and "nope.safetensors does not exist" in run.stderr
