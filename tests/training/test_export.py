"""`nanomorph export`: tiny runs trained on generated images -> ONNX in a store, parity, integrity, int8."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from nanomorph.contract import Contract, read_image, to_model_input
from nanomorph.runtime import CPU, OnnxModel, Segmenter
from nanomorph.runtime import Classifier as OnnxClassifier
from nanomorph.store import IntegrityError, list_models, resolve
from service.loading import _served_sha256
from tests.fixtures.cli import nanomorph
from training.backbones import create_backbone, save_backbone
from training.export import check_parity, export_runs, load_classifier_job
from training.models import Classifier, build_unet

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CONTRACT = Contract(image_size=32, tile_size=64, tile_overlap=16)
CLASSES = ["bright", "dark"]  # alphabetical, as list_classification orders them


def _image(bright: bool, rng: np.random.Generator, size: int = 40) -> np.ndarray:
    img = rng.normal(40, 5, (size, size))
    y, x = rng.integers(4, size - 12, 2)
    img[y : y + 8, x : x + 8] = 200
    if bright:
        img = 240 - img
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Generated data and tiny encoder / classifier / segmenter runs in the documented formats."""
    root = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(0)
    data = root / "data" / "classification"
    for cls in CLASSES:
        (data / cls).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(_image(cls == "bright", rng)).save(data / cls / f"{cls}_{i}.png")
    seg = root / "data" / "segmentation"
    (seg / "images").mkdir(parents=True)
    (seg / "masks").mkdir(parents=True)
    for i in range(2):
        img = _image(False, rng, 80)
        Image.fromarray(img).save(seg / "images" / f"f{i}.png")
        Image.fromarray((img > 120).astype(np.uint8)).save(seg / "masks" / f"f{i}.png")

    torch.manual_seed(0)
    meta = {
        "architecture": "resnet18",
        "method": "simclr",
        "image_size": 32,
        "contract": CONTRACT.to_json(),
        "in_chans": 1,
        "epochs": 1,
        "embedding_dim": 512,
    }
    enc = root / "runs" / "pretrain"
    backbone = create_backbone("resnet18").eval()
    save_backbone(backbone, enc / "backbone.safetensors", meta)
    (enc / "config.yaml").write_text(yaml.safe_dump({"data": str(root / "data")}))

    # Classifier: the head trained for a few steps on the frozen encoder's features.
    x = np.stack(
        [
            to_model_input(read_image(p)[0], CONTRACT)
            for cls in CLASSES
            for p in sorted((data / cls).glob("*.png"))
        ]
    )
    y = torch.tensor([k for k in range(2) for _ in range(8)])
    model = Classifier(backbone, 2).eval()
    with torch.no_grad():
        feats = model.features(torch.from_numpy(x))
    opt = torch.optim.Adam(model.head.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model.head(feats), y)
        loss.backward()
        opt.step()
    cls_run = root / "runs" / "classifier"
    save_backbone(
        model,
        cls_run / "classifier.safetensors",
        {**meta, "format": "nanomorph-classifier/1", "classes": json.dumps(CLASSES), "mode": "linear"},
    )
    with torch.no_grad():
        emb = model.embed(torch.from_numpy(x)).numpy()
    centroids = np.stack([emb[y.numpy() == k].mean(0) for k in range(2)])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    (cls_run / "classes.json").write_text(json.dumps(CLASSES))
    (cls_run / "ood.json").write_text(
        json.dumps({"centroids": centroids.tolist(), "threshold": 0.5, "metric": "cosine"})
    )
    metrics = {"accuracy": 1.0, "macro_f1": 1.0, "n_train": 8, "n_val": 2, "n_test": 6, "seed": 0}
    (cls_run / "metrics.json").write_text(json.dumps(metrics))
    cfg = {"data": str(data), "labels_per_class": "all", "val_fraction": 0.2, "test_fraction": 0.3, "seed": 0}
    (cls_run / "config.yaml").write_text(yaml.safe_dump(cfg))

    seg_run = root / "runs" / "segmenter"
    seg_run.mkdir(parents=True)
    unet = build_unet("resnet18", 2).eval()
    seg_meta = {
        "format": "nanomorph-segmenter/1",
        "architecture": "resnet18",
        "classes": json.dumps(["background", "wire"]),
        "contract": CONTRACT.to_json(),
    }
    save_file(
        {k: v.contiguous() for k, v in unet.state_dict().items()},
        str(seg_run / "segmenter.safetensors"),
        seg_meta,
    )
    (seg_run / "classes.json").write_text(json.dumps(["background", "wire"]))
    (seg_run / "metrics.json").write_text(
        json.dumps({"mean_iou_foreground": 0.5, "split": {"train": ["f0"], "test": ["f1"]}})
    )
    (seg_run / "config.yaml").write_text(yaml.safe_dump({"data": str(seg)}))
    return {"root": root, "encoder": enc, "classifier": cls_run, "segmenter": seg_run, "data": data}


def test_export_cli_all_three(runs: dict[str, Path]) -> None:
    store = runs["root"] / "store"
    cmd = [
        "export",
        "--encoder", str(runs["encoder"]), "--classifier", str(runs["classifier"]),
        "--segmenter", str(runs["segmenter"]), "--name", "lab", "--version", "v1", "--store", str(store),
    ]  # fmt: skip
    done = nanomorph(*cmd, env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    tags = json.loads(done.stdout.strip().splitlines()[-1])["tags"]
    assert tags == {"embed": "lab-embed:v1", "classify": "lab-classify:v1", "segment": "lab-segment:v1"}

    for task, tag in tags.items():
        model = resolve(tag, store)
        # Segment models also record their inference tiles per provider (larger than the training tile).
        expected = CONTRACT.with_infer_tiles() if task == "segment" else CONTRACT
        assert model.task == task and model.contract == expected
        if task == "segment":
            assert model.contract.infer_tile_cpu > CONTRACT.tile_size and model.contract.infer_tile_cuda
        # One self-contained file, opset >= 17, dynamic batch axis, the contract inside.
        assert sorted(p.name for p in model.path.iterdir()) == ["README.md", "manifest.json", "model.onnx"]
        proto = onnx.load(str(model.onnx_path))
        assert proto.opset_import[0].version >= 17
        dims = proto.graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch"
        assert model.manifest["parity"]["max_abs_diff"] <= 1e-4
        assert model.manifest["parity"]["real_images"] > 0
        assert model.metadata["provenance"]["source_sha256"]
        card = (model.path / "README.md").read_text()
        for section in ("## Data", "## Metrics", "## Intended use", "## Limitations", "## How to call it"):
            assert section in card
    seg = resolve(tags["segment"], store)
    dims = onnx.load(str(seg.onnx_path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[2:]] == ["height", "width"]
    clf = resolve(tags["classify"], store)
    assert clf.classes == CLASSES and clf.metrics["accuracy"] == 1.0 and "seed" not in clf.metrics
    assert (
        clf.ood is not None
        and len(clf.ood["centroids"]) == 2
        and clf.metadata["encoder"]["method"] == "simclr"
    )

    # The stored classifier separates the generated classes, through the runtime and the contract.
    images = [read_image(p)[0] for p in sorted(runs["data"].glob("*/*.png"))]
    labels = [p.parent.name for p in sorted(runs["data"].glob("*/*.png"))]
    preds = [r["label"] for r in OnnxClassifier(clf).predict(images)]
    assert np.mean([p == t for p, t in zip(preds, labels, strict=True)]) >= 0.9
    mask = Segmenter(seg).predict(np.zeros((70, 90), dtype=np.float32))["mask"]
    assert mask.shape == (70, 90)

    # Re-running skips the finished work; the listing shows the three models.
    again = nanomorph(*cmd[:-4], "--store", str(store))
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["tags"] == tags
    assert len(list_models(store)) == 3
    listed = nanomorph("models", "list", "--store", store)
    assert listed.returncode == 0, listed.stderr
    listing = listed.stdout
    assert "lab-classify:v1" in listing and "bright,dark" in listing

    # A tampered weight is refused on load.
    path = clf.onnx_path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match its manifest"):
        resolve(tags["classify"], store)


def test_parity_failure_stores_nothing(runs: dict[str, Path], tmp_path: Path) -> None:
    from training.export import export_onnx

    job = load_classifier_job(runs["classifier"])
    path = export_onnx(job, tmp_path / "classify.onnx")
    with torch.no_grad():
        head: torch.nn.Linear = job.net.head  # type: ignore[assignment]
        head.bias[0] += 5.0  # PyTorch now disagrees with the exported graph
    with pytest.raises(ValueError, match=r"disagree by up to .*> 0\.0001"):
        check_parity(job, path)
    with pytest.raises(FileNotFoundError, match="classifier.safetensors does not exist"):
        export_runs(classifier=tmp_path, store=tmp_path / "store")
    assert not (tmp_path / "store").exists()


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_quantize_int8(runs: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "store"
    tags = export_runs(
        classifier=runs["classifier"],
        segmenter=runs["segmenter"],
        store=store,
        version="q1",
        quantize="int8",
        max_accuracy_drop=0.5,
    )
    model = resolve(tags["classify"], store)
    quant = model.manifest["quantization"]
    assert quant["kept"] is True and quant["split"] == "validation" and quant["n_eval"] == 2
    assert quant["metric"] == "accuracy"
    assert 0.0 <= quant["accuracy_int8"] <= 1.0 and quant["speedup"] > 0
    # model.onnx stays fp32 (for CUDA and NANOMORPH_PRECISION=fp32); the int8 model is stored beside it.
    assert model.int8_path is not None and "model.int8.onnx" in model.manifest["files"]
    assert "QuantizeLinear" in _ops(model.int8_path) and "Softmax" in _ops(model.int8_path)
    assert "QuantizeLinear" not in _ops(model.onnx_path)
    assert model.metadata["provenance"]["quantization"]["kept"] is True

    # The segmenter: checked on foreground mean IoU (its split has no validation images: training).
    seg = resolve(tags["segment"], store)
    quant = seg.manifest["quantization"]
    assert quant["metric"] == "mean_iou_foreground" and quant["split"].startswith("training")
    assert quant["n_eval"] == 1 and quant["kept"] is True and 0.0 <= quant["accuracy_int8"] <= 1.0
    assert seg.int8_path is not None and "QuantizeLinear" in _ops(seg.int8_path)
    assert sorted(p.name for p in seg.path.iterdir()) == [
        "README.md",
        "manifest.json",
        "model.int8.onnx",
        "model.onnx",
    ]
    assert "int8 quantisation kept" in (seg.path / "README.md").read_text()
    # Served: int8 on CPU by default, fp32 when asked; both segment a frame, nearly alike.
    int8 = OnnxModel(seg, providers=[CPU])
    fp32 = OnnxModel(seg, providers=[CPU], precision="fp32")
    assert (int8.precision, fp32.precision) == ("int8", "fp32")
    # /models and the Prometheus model gauge name the sha256 of the file each session runs.
    files = seg.manifest["files"]
    assert (
        _served_sha256(seg, int8)
        == files["model.int8.onnx"]
        != _served_sha256(seg, fp32)
        == files["model.onnx"]
    )
    frame = read_image(sorted((runs["root"] / "data" / "segmentation" / "images").glob("*.png"))[0])[0]
    probs8, probs32 = Segmenter(int8).probabilities(frame), Segmenter(fp32).probabilities(frame)
    assert probs8.shape == probs32.shape == (2, *frame.shape)
    assert np.abs(probs8 - probs32).max() < 0.2 and not np.array_equal(probs8, probs32)

    # A bound no model can meet: the int8 models are refused and only the fp32 ones stored.
    tags = export_runs(
        classifier=runs["classifier"],
        segmenter=runs["segmenter"],
        store=store,
        version="q2",
        quantize="int8",
        max_accuracy_drop=-1.0,
        force=True,
    )
    for tag in tags.values():
        model = resolve(tag, store)
        assert model.manifest["quantization"]["kept"] is False and model.int8_path is None
        assert "QuantizeLinear" not in _ops(model.onnx_path)
        assert OnnxModel(model, providers=[CPU]).precision == "fp32"
