"""``nanomorph export``: run folders -> self-contained ONNX models in the model store.

For an encoder run (``backbone.safetensors``), a classifier run (``classifier.safetensors``) and a
segmenter run (``segmenter.safetensors``) this writes up to three ONNX graphs (opset 17, one file
each, dynamic batch axis; docs/architecture.md §4):

* ``embed``: ``image`` (N,1,S,S) -> ``embedding`` (N,D), L2-normalised;
* ``classify``: ``image`` (N,1,S,S) -> ``probabilities`` (N,C) (softmax in the graph) and ``embedding``;
* ``segment``: ``image`` (N,1,H,W), H and W multiples of 32 -> ``probabilities`` (N,C,H,W).

The preprocessing contract, classes, metrics, OOD reference, encoder and provenance travel inside
each file (``metadata_props``). Before anything is stored, onnxruntime is checked against PyTorch on
random inputs and on real training images at batch 1 and 7 (two input sizes for ``segment``); a
max abs difference above the tolerance (1e-4) fails the export with the numbers. ``--quantize int8``
adds static int8 quantisation (QDQ, per-channel weights, calibrated on training images) of the
``classify`` and ``segment`` models, kept only if their accuracy (segment: foreground mean IoU) on
the validation split drops by at most ``--max-accuracy-drop``; a kept int8 model is stored as
``model.int8.onnx`` beside the fp32 ``model.onnx`` (served on CPU, fp32 on CUDA). Each stored model gets a model card (``README.md``) and a manifest with the
sha256 of its files. Exporting the same runs again into the same store is skipped (``--force``
exports anew).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nanomorph import __version__
from nanomorph.config import load_yaml, yaml_defaults
from nanomorph.contract import Contract, list_images, normalise, read_image, tile, to_model_input
from nanomorph.store import (
    INT8_FILE,
    META_PREFIX,
    StoredModel,
    default_store,
    list_models,
    make_tag,
    metadata_props,
    new_version,
    save_model,
)
from nanomorph.tasks import TASKS, get_task
from training import runs
from training.artifacts import (
    BACKBONE_FORMAT,
    contract_of,
    git_commit,
    read_weights,
    run_weights,
    sha256_file,
)
from training.models import Classifier

log = logging.getLogger("nanomorph.export")

OPSET = 17
TOLERANCE = 1e-4
PARITY_BATCHES = (1, 7)
# Ops quantised to int8. The tail (L2 norm, softmax) stays float so probabilities are not coarsened.
QUANT_OPS = ["Conv", "Gemm", "MatMul", "Relu", "MaxPool"]
_SKIP_METRICS = {"seed", "seconds"}


# ---------------------------------------------------------------------------------------- networks


class EmbedNet(nn.Module):
    """``image`` -> L2-normalised backbone features."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(x), dim=1)


class ClassifyNet(nn.Module):
    """``image`` -> (softmax probabilities, L2-normalised features), both from one backbone pass."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.backbone: nn.Module = classifier.backbone
        self.head: nn.Linear = classifier.head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(x)
        return F.softmax(self.head(features), dim=1), F.normalize(features, dim=1)


class SegmentNet(nn.Module):
    """``image`` -> per-pixel class probabilities (softmax over channels)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.unet(x), dim=1)


# ------------------------------------------------------------------------------------- run folders


@dataclass
class ExportJob:
    """One model to export: the network, what goes into its metadata, and where it came from."""

    task: str
    net: nn.Module
    outputs: list[str]
    contract: Contract
    run_dir: Path
    weights: Path
    classes: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    ood: dict[str, Any] | None = None
    encoder: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    images: list[Path] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    instances: dict[str, Any] | None = None  # segment: nanomorph.particles.InstanceParams

    @property
    def dynamic_hw(self) -> bool:
        return get_task(self.task).tiled


def _json_file(path: Path, default: Any = None) -> Any:
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from exc


def _scalar_metrics(metrics: Any) -> dict[str, Any]:
    """The top-level numbers of a run's metrics (what goes into the model's metadata)."""
    if not isinstance(metrics, dict):
        return {}
    return {
        k: v
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _SKIP_METRICS
    }


def _last_jsonl(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        return json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        return {}


def _run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    return load_yaml(path) if path.is_file() else {}


def _training_images(run_dir: Path, data: str | Path | None, limit: int = 7) -> list[Path]:
    """Up to ``limit`` images the run trained on (its config's ``data``), evenly spread; masks excluded."""
    folder = Path(data) if data else None
    if folder is None:
        recorded = _run_config(run_dir).get("data")
        folder = Path(recorded) if recorded else None
    if folder is None or not folder.is_dir():
        return []
    paths = [
        p
        for p in list_images(folder, recursive=True)
        if not {"masks", "instances"} & {part.lower() for part in p.relative_to(folder).parts[:-1]}
    ]
    if len(paths) > limit:
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, limit).round().astype(int)]
    return paths


def _encoder_info(meta: dict[str, str]) -> dict[str, Any]:
    return {
        "architecture": meta.get("architecture", "unknown"),
        "method": meta.get("method", "unknown"),
        "source": meta.get("encoder_source", ""),
    }


def load_encoder_job(path: str | Path, data: str | Path | None = None) -> ExportJob:
    """The ``embed`` job of a pretraining run (``backbone.safetensors``)."""
    from training.backbones import create_backbone

    run_dir, weights = run_weights(path, get_task("embed").weights, get_task("embed").export_flag)
    state, meta = read_weights(weights, BACKBONE_FORMAT, required=("architecture",))
    backbone = create_backbone(meta["architecture"])
    backbone.load_state_dict(state, strict=True)
    metrics = _scalar_metrics(_last_jsonl(run_dir / "metrics.jsonl")) or _scalar_metrics(
        _json_file(run_dir / "metrics.json", {})
    )
    config = _run_config(run_dir)
    return ExportJob(
        task="embed",
        net=EmbedNet(backbone),
        outputs=list(get_task("embed").outputs),
        contract=contract_of(meta, weights),
        run_dir=run_dir,
        weights=weights,
        metrics=metrics,
        encoder={**_encoder_info(meta), "source": str(weights), "epochs": meta.get("epochs", "")},
        data={"folder": str(config.get("data", "")), "labels": "none (self-supervised)"},
        images=_training_images(run_dir, data),
        config=config,
    )


def load_classifier_job(path: str | Path, data: str | Path | None = None) -> ExportJob:
    """The ``classify`` job of a classifier run (``classifier.safetensors`` + classes/ood/metrics)."""
    from training.backbones import create_backbone

    run_dir, weights = run_weights(path, get_task("classify").weights, get_task("classify").export_flag)
    state, meta = read_weights(weights)
    if "architecture" not in meta or not any(k.startswith("head.") for k in state):
        raise ValueError(
            f"{weights}: not a nanomorph classifier (needs 'architecture' metadata and head.* weights)"
        )
    classes = _json_file(run_dir / "classes.json") or json.loads(meta.get("classes", "[]"))
    if not classes:
        raise ValueError(f"{run_dir}: no classes.json and no 'classes' metadata")
    model = Classifier(create_backbone(meta["architecture"]), len(classes))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"{weights} does not fit a {meta['architecture']} classifier with {len(classes)} classes ({exc})"
        ) from exc
    metrics_all = _json_file(run_dir / "metrics.json", {}) or {}
    ood = _json_file(run_dir / "ood.json")
    config = _run_config(run_dir)
    counts = {
        k: metrics_all[k]
        for k in ("n_train", "n_val", "n_test", "label_counts", "labels_per_class")
        if k in metrics_all
    }
    return ExportJob(
        task="classify",
        net=ClassifyNet(model),
        outputs=list(get_task("classify").outputs),
        contract=contract_of(meta, weights),
        run_dir=run_dir,
        weights=weights,
        classes=[str(c) for c in classes],
        metrics=_scalar_metrics(metrics_all),
        ood=ood,
        encoder={**_encoder_info(meta), "mode": meta.get("mode", "")},
        data={"folder": str(config.get("data", "")), **counts},
        images=_training_images(run_dir, data),
        config=config,
    )


def load_segmenter_job(path: str | Path, data: str | Path | None = None) -> ExportJob:
    """The ``segment`` job of a segmenter run (``segmenter.safetensors``: an smp U-Net)."""
    from training.models import build_unet

    run_dir, weights = run_weights(path, get_task("segment").weights, get_task("segment").export_flag)
    state, meta = read_weights(weights)
    classes = _json_file(run_dir / "classes.json") or json.loads(meta.get("classes", "[]"))
    if "architecture" not in meta or not classes:
        raise ValueError(f"{weights}: not a nanomorph segmenter (needs 'architecture' and classes)")
    unet = build_unet(meta["architecture"], len(classes))
    try:
        unet.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"{weights} does not fit a {meta['architecture']} U-Net with {len(classes)} classes ({exc})"
        ) from exc
    metrics_all = _json_file(run_dir / "metrics.json", {}) or {}
    config = _run_config(run_dir)
    split = metrics_all.get("split")
    split = split if isinstance(split, dict) else {}
    counts = {f"n_{k}": len(v) for k, v in split.items() if isinstance(v, list)}
    return ExportJob(
        task="segment",
        net=SegmentNet(unet),
        outputs=list(get_task("segment").outputs),
        # Inference tiles per provider (fully convolutional: larger than the training tile).
        contract=contract_of(meta, weights).with_infer_tiles(),
        run_dir=run_dir,
        weights=weights,
        classes=[str(c) for c in classes],
        metrics=_scalar_metrics(metrics_all),
        encoder=_encoder_info(meta),
        data={"folder": str(config.get("data", "")), **counts},
        images=_training_images(run_dir, data),
        config=config,
        instances=json.loads(meta["instances"]) if meta.get("instances") else None,
    )


# ------------------------------------------------------------------------------------------- ONNX


def export_onnx(job: ExportJob, path: Path, opset: int = OPSET) -> Path:
    """Traces ``job.net`` to one self-contained ONNX file (no ``.onnx.data`` beside it)."""
    import onnx

    net = job.net.eval()
    side = job.contract.tile_size if job.dynamic_hw else job.contract.image_size
    example = torch.rand(2, 1, side, side)
    axes: dict[str, dict[int, str]] = {"image": {0: "batch"}}
    if job.dynamic_hw:
        axes["image"].update({2: "height", 3: "width"})
    for name in job.outputs:
        axes[name] = {0: "batch", 2: "height", 3: "width"} if job.dynamic_hw else {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter
        torch.onnx.export(
            net,
            (example,),
            str(path),
            input_names=["image"],
            output_names=job.outputs,
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    net.eval()  # the exporter restores the module's previous mode; keep eval for the parity check
    model = onnx.load(str(path))
    onnx.save_model(model, str(path), save_as_external_data=False)
    for stray in path.parent.glob(path.name + ".data"):
        stray.unlink()
    onnx.checker.check_model(str(path))
    return path


def set_metadata(path: Path, props: dict[str, str]) -> None:
    """Replaces the ``nanomorph.*`` ``metadata_props`` of an ONNX file (in place)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    keep = {p.key: p.value for p in model.metadata_props if not p.key.startswith(META_PREFIX)}
    del model.metadata_props[:]
    helper.set_model_props(model, {**keep, **props})
    onnx.save_model(model, str(path), save_as_external_data=False)


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def parity_inputs(job: ExportJob, seed: int = 0) -> dict[tuple[int, int], dict[str, np.ndarray]]:
    """Per input size, named batches of 7: random inputs and real training images (their tiles for
    ``segment``, which gets two sizes). :func:`check_parity` runs each at batch 1 and 7."""
    rng = np.random.default_rng(seed)
    c = job.contract
    if job.dynamic_hw:
        sizes = [(c.tile_size, c.tile_size), (max(32, c.tile_size // 2), c.tile_size + 32)]
    else:
        sizes = [(c.image_size, c.image_size)]
    n = max(PARITY_BATCHES)
    real: list[np.ndarray] = []
    for path in job.images:
        image, _ = read_image(path)
        if job.dynamic_hw:
            norm = normalise(image, c)
            # Pad (reflect) so that every size can be cropped from real content.
            big = max(s for hw in sizes for s in hw)
            tiles, _, _ = tile(norm, big, 0)
            real.append(tiles[len(tiles) // 2][None])
        else:
            real.append(to_model_input(image, c))
    out: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    for h, w in sizes:
        out[(h, w)] = {"random": rng.random((n, 1, h, w), dtype=np.float32)}
        if real:
            batch = np.stack([real[i % len(real)] for i in range(n)]).astype(np.float32)
            out[(h, w)]["real"] = np.ascontiguousarray(batch[:, :, :h, :w])
    return out


def check_parity(job: ExportJob, onnx_path: Path, tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Max abs difference of every output, onnxruntime vs PyTorch, on random and real inputs at
    batch 1 and 7; raises ValueError (with the numbers) above ``tolerance``.

    PyTorch runs once per input size on all batches together (eval mode: samples are independent);
    onnxruntime runs every batch size separately, which also exercises the dynamic batch axis.
    """
    session = _session(onnx_path)
    report: dict[str, float] = {}
    for (h, w), batches in parity_inputs(job).items():
        names = list(batches)
        stacked = np.concatenate([batches[k] for k in names])
        with torch.no_grad():
            ref = job.net(torch.from_numpy(stacked))
        refs = [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
        for i, kind in enumerate(names):
            offset = i * len(batches[kind])
            for n in PARITY_BATCHES:
                got = session.run(job.outputs, {"image": batches[kind][:n]})
                for out_name, r, g in zip(job.outputs, refs, got, strict=True):
                    diff = float(np.abs(r[offset : offset + n] - g).max())
                    report[f"{kind} {n}x{h}x{w} {out_name}"] = diff
    worst = max(report.values())
    if worst > tolerance:
        bad = ", ".join(f"{k}: {v:.2e}" for k, v in report.items() if v > tolerance)
        raise ValueError(
            f"{job.task}: onnxruntime and PyTorch disagree by up to {worst:.2e} (> {tolerance:g}): {bad}; "
            "nothing was stored"
        )
    n_real = len(job.images)
    if not n_real:
        log.warning(
            "%s: no training images found (run config 'data'); parity checked on random inputs only", job.task
        )
    log.info(
        "%s: parity ok, max abs diff %.2e over %d checks (%d real images)",
        job.task,
        worst,
        len(report),
        n_real,
    )
    return {"max_abs_diff": worst, "tolerance": tolerance, "checks": report, "real_images": n_real}


# ---------------------------------------------------------------------------------- quantisation


def _labeled_split(job: ExportJob, data: str | Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """``(calibration inputs, validation inputs, validation labels, split name)`` of a classifier run,
    rebuilt from its ``config.yaml`` exactly as ``finetune-cls`` drew it (the test split is never used)."""
    from training.finetune_cls import load_images
    from training.splits import make_split, parse_labels_per_class

    cfg = {**yaml_defaults("finetune-cls"), **job.config}  # a run's config.yaml over today's defaults
    folder = data or cfg.get("data")
    if not folder or not Path(folder).is_dir():
        raise ValueError(
            f"--quantize int8 needs the classifier's labeled images to measure accuracy: {job.run_dir / 'config.yaml'} "
            f"names data {folder!r}, which does not exist; pass --data DIR"
        )
    images = load_images(folder, job.contract, cfg.get("group_column"), show_progress=False)
    if list(images.class_names) != job.classes:
        raise ValueError(f"{folder}: classes {images.class_names} differ from the run's {job.classes}")
    split = make_split(
        images.labels,
        parse_labels_per_class(cfg["labels_per_class"]),
        float(cfg["val_fraction"]),
        float(cfg["test_fraction"]),
        int(cfg["seed"]),
        groups=None if images.groups is None else list(images.groups),
        class_names=images.class_names,
    )
    evaluate, name = (
        (split.val, "validation") if split.val.size else (split.train, "training (no validation split)")
    )
    # Tiled frames: calibrate and compare fp32/int8 on their tiles (each labeled with its frame's class).
    train_rows, eval_rows = images.rows(split.train), images.rows(evaluate)
    return images.x[train_rows[:64]], images.x[eval_rows], images.row_labels(eval_rows), name


class _Calibration:
    """Feeds calibration batches to onnxruntime's quantiser."""

    def __init__(self, x: np.ndarray, batch: int = 8) -> None:
        self.batches = [x[i : i + batch] for i in range(0, len(x), batch)]

    def get_next(self) -> dict[str, np.ndarray] | None:
        return {"image": self.batches.pop(0)} if self.batches else None

    def rewind(self) -> None:  # pragma: no cover - not used by MinMax calibration
        pass


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray) -> Path:
    """Static int8 quantisation (QDQ, per-channel weights, MinMax calibration on ``calibration``)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_name(out.stem + ".pre.onnx")
    try:
        quant_pre_process(str(fp32), str(pre))
    except Exception as exc:  # the optional optimisation pass; quantise the plain graph instead
        log.warning("quantisation pre-processing failed (%s); quantising without it", exc)
        pre = fp32

    class Reader(_Calibration, CalibrationDataReader):  # type: ignore[misc]
        pass

    quantize_static(
        str(pre),
        str(out),
        Reader(calibration),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=QUANT_OPS,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return out


def _accuracy(path: Path, x: np.ndarray, y: np.ndarray, batch: int = 32) -> float:
    session = _session(path)
    preds = np.concatenate(
        [
            session.run(["probabilities"], {"image": x[i : i + batch]})[0].argmax(1)
            for i in range(0, len(x), batch)
        ]
    )
    return float((preds == y).mean()) if len(y) else float("nan")


def images_per_second(path: Path, x: np.ndarray, seconds: float = 1.0, warmup: int = 2) -> float:
    """onnxruntime throughput on batch ``x`` (repeated for about ``seconds``)."""
    session = _session(path)
    for _ in range(warmup):
        session.run(None, {"image": x})
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n < 3:
        session.run(None, {"image": x})
        n += 1
    return n * len(x) / (time.perf_counter() - start)


def _segment_split(
    job: ExportJob, data: str | Path | None, n_calibration: int = 16
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray], str]:
    """``(calibration tiles, validation frames (normalised), their semantic masks, split name)`` of
    a segmenter run: the stems ``finetune-seg`` recorded in its ``metrics.json`` (the test split is
    never used); calibration takes ``n_calibration`` tiles spread over the training frames."""
    from nanomorph.particles import InstanceParams
    from training.seg_data import find_pairs, load_pair

    folder = data or job.config.get("data")
    if not folder or not Path(folder).is_dir():
        raise ValueError(
            f"--quantize int8 needs the segmenter's labeled images to measure its accuracy: "
            f"{job.run_dir / 'config.yaml'} names data {folder!r}, which does not exist; pass --data DIR"
        )
    split = (_json_file(job.run_dir / "metrics.json", {}) or {}).get("split") or {}
    pairs = {p.stem: p for p in find_pairs(folder)}
    inst = InstanceParams.from_dict(job.instances)
    n_semantic = len(job.classes) - (1 if inst else 0)

    def load(name: str) -> list[tuple[np.ndarray, np.ndarray]]:
        stems = [str(s) for s in split.get(name) or []]
        return [load_pair(pairs[s], job.contract, n_semantic) for s in stems if s in pairs]

    train, evaluate, name = load("train"), load("val"), "validation"
    if not evaluate:
        evaluate, name = train, "training (no validation split)"
    if not train:
        raise ValueError(f"{job.run_dir / 'metrics.json'}: no training images of its split found in {folder}")
    side, overlap = job.contract.tile_size, job.contract.tile_overlap
    tiles = np.concatenate([tile(image, side, overlap)[0] for image, _ in train])
    pick = np.linspace(0, len(tiles) - 1, min(n_calibration, len(tiles))).round().astype(int)
    calib = np.ascontiguousarray(tiles[pick][:, None], dtype=np.float32)
    return calib, [img for img, _ in evaluate], [mask for _, mask in evaluate], name


def _mean_iou(
    path: Path, frames: list[np.ndarray], masks: list[np.ndarray], job: ExportJob, batch: int = 8
) -> float:
    """Hard foreground mean IoU of an ONNX segmenter on normalised frames, tiled and scored as
    ``finetune-seg`` validates (training tile and overlap, blended; an instance model's rim folded
    into the particle: ``training.seg_losses.score_prob_maps``)."""
    from nanomorph.contract import untile
    from nanomorph.particles import InstanceParams
    from training.seg_losses import score_prob_maps

    session = _session(path)
    side, overlap = job.contract.tile_size, job.contract.tile_overlap

    def prob_map(frame: np.ndarray) -> np.ndarray:
        tiles, positions, _ = tile(frame, side, overlap)
        batches = (np.ascontiguousarray(tiles[i : i + batch, None]) for i in range(0, len(tiles), batch))
        probs = np.concatenate([session.run(["probabilities"], {"image": x})[0] for x in batches])
        return untile(probs, positions, frame.shape, side)

    inst = InstanceParams.from_dict(job.instances)
    score = score_prob_maps((prob_map(f) for f in frames), masks, job.classes, inst)["mean_iou_foreground"]
    return float("nan") if score is None else float(score)


def try_quantize(
    job: ExportJob, fp32: Path, max_drop: float, data: str | Path | None
) -> tuple[Path | None, dict[str, Any]]:
    """Quantises a classify or segment model and checks what it costs on the run's validation
    split (classify: accuracy; segment: foreground mean IoU, both bound by ``max_drop``);
    returns the int8 file (None where refused) and the report."""
    score: Any
    if job.task == "segment":
        calib, frames, masks, split_name = _segment_split(job, data)
        metric, n_eval, bench_x = "mean_iou_foreground", len(frames), calib
        score = functools.partial(_mean_iou, frames=frames, masks=masks, job=job)
    else:
        calib, x_val, y_val, split_name = _labeled_split(job, data)
        metric, n_eval, bench_x = "accuracy", len(y_val), x_val if len(x_val) else calib
        score = functools.partial(_accuracy, x=x_val, y=y_val)
    int8 = quantize_int8(fp32, fp32.with_name(f"{job.task}.int8.onnx"), calib)
    acc_fp32, acc_int8 = score(fp32), score(int8)
    bench = np.ascontiguousarray(np.resize(bench_x, (8, *calib.shape[1:])))
    speed_fp32, speed_int8 = images_per_second(fp32, bench), images_per_second(int8, bench)
    drop = acc_fp32 - acc_int8
    report = {
        "mode": "int8 static (QDQ, per-channel)",
        "metric": metric,
        "split": split_name,
        "n_eval": int(n_eval),
        "accuracy_fp32": acc_fp32,
        "accuracy_int8": acc_int8,
        "accuracy_drop": drop,
        "max_accuracy_drop": max_drop,
        "speedup": speed_int8 / speed_fp32,
        "images_per_s_fp32": speed_fp32,
        "images_per_s_int8": speed_int8,
        "kept": bool(drop <= max_drop),
    }
    log.info(
        "%s int8: %s %s %.4f -> %.4f (drop %.4f, bound %.4f, n=%d), speed-up %.2fx (batch 8)",
        job.task,
        split_name,
        metric,
        acc_fp32,
        acc_int8,
        drop,
        max_drop,
        n_eval,
        report["speedup"],
    )
    if not report["kept"]:
        log.warning(
            "%s int8 model refused: %s drops by %.4f > %.4f; storing the fp32 model only",
            job.task,
            metric,
            drop,
            max_drop,
        )
        return None, report
    return int8, report


# ------------------------------------------------------------------------------------ model cards


def _card_facts(job: ExportJob) -> list[str]:
    """Data, classes and metrics sections of a model card."""
    lines = ["## Data", ""]
    lines += [
        f"- {k.replace('_', ' ')}: {json.dumps(v) if isinstance(v, (dict, list)) else v}"
        for k, v in job.data.items()
    ]
    lines += ["", "## Classes", "", ", ".join(job.classes) or "(none: embedding model)", ""]
    lines += ["## Metrics (held-out test split of the training run)", ""]
    lines += [
        f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in job.metrics.items()
    ] or ["- none recorded"]
    return lines


def _card_export(job: ExportJob, parity: dict[str, Any], quant: dict[str, Any] | None) -> list[str]:
    """The export section of a model card: opset, parity, quantisation, encoder."""
    lines = [
        "",
        "## Export",
        "",
        f"- ONNX opset {OPSET}, dynamic batch{', dynamic height/width (multiples of 32)' if job.dynamic_hw else ''}",
        f"- parity onnxruntime vs PyTorch: max abs diff {parity['max_abs_diff']:.2e} "
        f"(tolerance {parity['tolerance']:g}; {parity['real_images']} real training images + random inputs)",
    ]
    if quant:
        lines.append(
            f"- int8 quantisation {'kept' if quant['kept'] else 'refused'}: {quant['split']} "
            f"{quant.get('metric', 'accuracy')} "
            f"{quant['accuracy_fp32']:.4f} -> {quant['accuracy_int8']:.4f}, speed-up {quant['speedup']:.2f}x"
        )
    lines.append(f"- encoder: {job.encoder.get('architecture')} ({job.encoder.get('method')} pretraining)")
    return lines


def _card_use(job: ExportJob, tag: str) -> list[str]:
    """Intended use, limitations, contract and how to call the model."""
    c = job.contract
    size = (
        f"{c.tile_size} px tiles (overlap {c.tile_overlap})"
        if job.dynamic_hw
        else f"{c.image_size} x {c.image_size} px"
    )
    return [
        "",
        "## Intended use",
        "",
        get_task(job.task).use,
        *_instances_card(job),
        "",
        "## Limitations",
        "",
        f"- Trained on single-channel images preprocessed with the contract below ({size}); images of "
        "another modality, magnification or contrast may be wrong without warning.",
        f"- Few labels: metrics come from {job.data.get('n_test', 'a small number of')} test images; "
        "treat them as estimates with wide uncertainty.",
        "- Check predictions on your own data before relying on them.",
        "",
        "## Preprocessing contract",
        "",
        f"`{c.to_json()}` (also inside model.onnx as `nanomorph.contract`).",
        "",
        "## How to call it",
        "",
        "```python",
        "from nanomorph.store import resolve",
        "from nanomorph.runtime import " + get_task(job.task).runtime,
        "from nanomorph.contract import read_image",
        f"model = resolve({tag!r}, STORE)  # 'bentoml' or the store folder",
        "image, _ = read_image('frame.dm4')",
        get_task(job.task).example,
        "```",
        "",
        "or `nanomorph predict` / `nanomorph serve`. Raw ONNX: input `image` float32 (N, 1, H, W) in [0, 1] "
        f"after the contract; outputs {', '.join(f'`{o}`' for o in job.outputs)}.",
        "",
    ]


def model_card(job: ExportJob, tag: str, parity: dict[str, Any], quant: dict[str, Any] | None) -> str:
    """The model card (README.md) of one stored model."""
    head = [
        f"# {tag}",
        "",
        f"nanomorph `{job.task}` model exported from `{job.run_dir}` ({job.weights.name}).",
        "",
    ]
    return "\n".join([*head, *_card_facts(job), *_card_export(job, parity, quant), *_card_use(job, tag)])


def _instances_card(job: ExportJob) -> list[str]:
    if not job.instances:
        return []
    return [
        "",
        f"Particles: method `{job.instances.get('method')}` (nanomorph.particles): the U-Net also predicts "
        "each particle's rim (`boundary` class, so touching particles are split by a band of rim pixels); "
        "connected interiors seed a watershed on the rim probability over the foreground. Chosen because it "
        "runs on the same U-Net, without torch at inference, deterministically in predict, the service and "
        f"training. Parameters (ONNX metadata `nanomorph.instances`): `{json.dumps(job.instances, sort_keys=True)}`.",
    ]


# ------------------------------------------------------------------------------------------ export


def _already_exported(
    store: str | Path, name: str, source_sha: str, quantize: str | None
) -> StoredModel | None:
    try:
        models = list_models(store)
    except FileNotFoundError:
        return None
    for model in models:
        prov = model.metadata.get("provenance") or {}
        if (
            model.name == name
            and prov.get("source_sha256") == source_sha
            and prov.get("quantize") == quantize
        ):
            return model
    return None


def _jobs_to_export(
    sources: dict[str, str | Path | None],
    name: str,
    store: str | Path,
    quantize: str | None,
    data: str | Path | None,
    force: bool,
) -> tuple[list[tuple[ExportJob, str]], dict[str, str]]:
    """``([(job, source sha256)], {task: tag already stored})``: the run-folder policy
    (training.runs) for the store: the same weights already stored under this name are skipped
    (before anything is built) unless ``force``."""
    loaders = {"embed": load_encoder_job, "classify": load_classifier_job, "segment": load_segmenter_job}
    jobs: list[tuple[ExportJob, str]] = []
    done_tags: dict[str, str] = {}
    for task in TASKS:
        source, loader = sources.get(task), loaders[task]
        if not source:
            continue
        _, weights = run_weights(source, get_task(task).weights, get_task(task).export_flag)
        source_sha = sha256_file(weights)
        task_quant = quantize if get_task(task).quantizable else None
        done = None if force else _already_exported(store, f"{name}-{task}".lower(), source_sha, task_quant)
        state = runs.RunState(finished=done is not None, started=done is not None)
        if runs.decide(f"{store}: {name}-{task}", state, {}, force=force) is runs.Action.SKIP:
            assert done is not None
            log.info("%s: %s is already stored as %s (--force exports it again)", task, weights, done.tag)
            done_tags[task] = done.tag
            continue
        jobs.append((loader(source, data), source_sha))  # type: ignore[operator]
    return jobs, done_tags


def _stage(
    job: ExportJob,
    source_sha: str,
    tag: str,
    folder: Path,
    quantize: str | None,
    checks: dict[str, Any],
    provenance_base: dict[str, Any],
) -> tuple[Path, dict[str, Any]]:
    """Exports one job to ONNX in ``folder``, checks parity, writes its metadata and (quantizable
    tasks, with ``--quantize int8``) quantises; returns the fp32 file to store as ``model.onnx``
    and the extra entries of its store entry (the int8 file among its ``files`` where kept)."""
    job_quant = quantize if get_task(job.task).quantizable else None
    log.info("%s: exporting %s", job.task, job.weights)
    fp32 = export_onnx(job, folder / f"{job.task}.onnx")
    parity = check_parity(job, fp32, checks["tolerance"])
    provenance = {
        "runs": {job.task: job.run_dir.name},
        "run_path": str(job.run_dir.resolve()),
        "source": job.weights.name,
        "source_sha256": source_sha,
        **provenance_base,
        "quantize": job_quant,
    }
    # Bound to the provenance dict itself: quantisation adds to it before the second call.
    props = functools.partial(
        metadata_props,
        job.task,
        job.contract,
        job.classes,
        job.metrics,
        job.ood,
        job.encoder,
        provenance,
        instances=job.instances,
    )
    set_metadata(fp32, props())
    int8, quant = None, None
    if job_quant == "int8":
        int8, quant = try_quantize(job, fp32, checks["max_accuracy_drop"], checks["data"])
        provenance["quantization"] = {k: quant[k] for k in ("kept", "accuracy_drop", "speedup")}
        set_metadata(fp32, props())
        if int8 is not None:
            set_metadata(int8, props())
    extra = {
        "readme": model_card(job, tag, parity, quant),
        "parity": {k: parity[k] for k in ("max_abs_diff", "tolerance", "real_images")},
        "data": job.data,
        "quantization": quant,
        # model.onnx stays fp32 (CUDA, NANOMORPH_PRECISION=fp32); the kept int8 model goes beside it
        **({"files": {INT8_FILE: int8}} if int8 is not None else {}),
    }
    return fp32, extra


def export_runs(
    encoder: str | Path | None = None,
    classifier: str | Path | None = None,
    segmenter: str | Path | None = None,
    *,
    name: str = "nanomorph",
    version: str | None = None,
    store: str | Path | None = None,
    quantize: str | None = None,
    max_accuracy_drop: float = 0.01,
    tolerance: float = TOLERANCE,
    data: str | Path | None = None,
    force: bool = False,
) -> dict[str, str]:
    """Exports runs to ONNX, checks parity, optionally quantises, and stores them.

    Every model is exported and checked before any is stored. Returns ``{task: tag}``.
    """
    if not (encoder or classifier or segmenter):
        raise ValueError("nothing to export: give --encoder, --classifier and/or --segmenter")
    if quantize not in (None, "none", "int8"):
        raise ValueError(f"--quantize {quantize!r}: only int8 is supported")
    quantize = None if quantize in (None, "none") else quantize
    store = store or default_store()
    version = version or new_version()
    sources = {"embed": encoder, "classify": classifier, "segment": segmenter}
    jobs, tags = _jobs_to_export(sources, name, store, quantize, data, force)
    provenance_base = {
        "git_commit": git_commit(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "nanomorph_version": __version__,
        "torch_version": torch.__version__,
    }
    checks = {"tolerance": tolerance, "max_accuracy_drop": max_accuracy_drop, "data": data}
    with tempfile.TemporaryDirectory(prefix="nanomorph-export-") as tmp:
        staged = []
        for job, source_sha in jobs:
            tag = make_tag(name, job.task, version)
            path, extra = _stage(job, source_sha, tag, Path(tmp), quantize, checks, provenance_base)
            staged.append((job, tag, path, extra))
        for job, tag, path, extra in staged:
            stored = save_model(path, store, tag, job.task, extra)
            log.info("%s: stored %s (%s)", job.task, stored.tag, stored.path)
            tags[job.task] = stored.tag
    return tags


# --------------------------------------------------------------------------------------------- the command (nanomorph.cli.export calls run)


def run(args: argparse.Namespace) -> int:
    tags = export_runs(
        args.encoder,
        args.classifier,
        args.segmenter,
        name=args.name,
        version=args.version,
        store=args.store,
        quantize=args.quantize,
        max_accuracy_drop=args.max_accuracy_drop,
        tolerance=args.tolerance,
        data=args.data,
        force=args.force,
    )
    print(json.dumps({"store": str(args.store or default_store()), "tags": tags}))
    return 0
