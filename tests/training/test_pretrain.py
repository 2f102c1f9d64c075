"""`nanomorph pretrain` as users run it: real folders, the CLI, a killed and resumed subprocess, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from nanomorph.contract import Contract
from tests.fixtures.cli import nanomorph, nanomorph_argv
from tests.fixtures.images import write_disc_frames as _dataset
from training.backbones import load_backbone
from training.runio import load_checkpoint, read_metrics

ROOT = Path(__file__).resolve().parents[2]
ARCH = "test_resnet"  # timm's tiny test network: same code path as resnet18, a fraction of the cost
VERDICTS = {"learned", "learned little", "collapsed or near-collapsed"}
TINY = ["--backbone", ARCH, "--image-size", "32", "--batch-size", "8", "--workers", "0", "--log-every", "2"]


def _labels(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for cls, value in (("dark", 40), ("bright", 200)):
        for i in range(4):
            path = root / cls / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(rng.normal(value, 30, (40, 40)), 0, 255).astype(np.uint8)).save(path)
    return root


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def test_run_folder_contents_and_rerun(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "unlabeled")
    out = tmp_path / "runs" / "bt"
    argv = ["pretrain", "--data", str(data), "--out", str(out), "--method", "barlowtwins", *TINY]
    argv += ["--projector", "64-64-128", "--epochs", "2", "--monitor-labels", str(_labels(tmp_path / "cls"))]
    assert nanomorph(*argv).returncode == 0

    assert {p.name for p in out.iterdir()} >= {
        "config.yaml",
        "metrics.jsonl",
        "checkpoint.pt",
        "backbone.safetensors",
        "README.md",
    }
    records = read_metrics(out / "metrics.jsonl")
    epochs = [r for r in records if r.get("kind") == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert all(
        np.isfinite(r["loss"]) and r["embedding_std"] > 0 and 0 <= r["knn_accuracy"] <= 1 for r in epochs
    )
    steps = [r for r in records if "kind" not in r]
    assert steps and all({"loss", "lr", "images_per_s"} <= set(r) for r in steps)

    ckpt = load_checkpoint(out / "checkpoint.pt")  # weights_only=True
    assert ckpt["epoch"] == 2 and isinstance(ckpt["rng"][0]["torch"], torch.Tensor)
    assert {"model", "optimizer", "scheduler"} <= set(ckpt)

    model, meta = load_backbone(out / "backbone.safetensors")
    assert meta["architecture"] == ARCH and meta["method"] == "barlowtwins" and meta["epochs"] == "2"
    assert meta["in_chans"] == "1" and meta["image_size"] == "32" and meta["git_commit"]
    assert Contract.from_json(meta["contract"]).image_size == 32
    assert int(meta["embedding_dim"]) == model.eval()(torch.rand(1, 1, 32, 32)).shape[1]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"] == "barlowtwins" and config["resolved"]["ssl"]["projector"] == [64, 64, 128]
    assert "barlowtwins" in (out / "README.md").read_text()

    # Label-free quality signals: measured before training (epoch 0) and after every epoch, then a
    # verdict line in the log, the model card and the backbone's metadata.
    measured = [r for r in records if "effective_rank" in r]
    assert [r["epoch"] for r in measured] == [0, 1, 2]
    assert all(1 <= r["effective_rank"] <= r["embedding_dim"] and r["alignment"] >= 0 for r in measured)
    verdict = [r for r in records if r.get("kind") == "verdict"]
    assert len(verdict) == 1 and verdict[0]["verdict"].split(":")[0] in VERDICTS
    assert verdict[0]["verdict"] in (out / "README.md").read_text()
    assert json.loads(meta["quality"])["verdict"] == verdict[0]["verdict"]

    # Re-running the finished run skips it, leaving the files alone.
    mtime = (out / "backbone.safetensors").stat().st_mtime_ns
    assert nanomorph(*argv).returncode == 0
    assert (out / "backbone.safetensors").stat().st_mtime_ns == mtime
    # Other settings into the same folder are refused with a clear message.
    refused = nanomorph(*argv[:-2], "--epochs", "3")
    assert refused.returncode == 2
    assert "epochs" in refused.stderr
    # A run saved before --ratio-max existed (its checkpoint lacks the key) used 4/3: it is the same
    # run as --ratio-max 1.333, and the default (1, shapes kept) is refused by name.
    assert config["resolved"]["ratio_max"] == 1.0
    ckpt["run"] = json.dumps({k: v for k, v in json.loads(ckpt["run"]).items() if k != "ratio_max"})
    torch.save(ckpt, out / "checkpoint.pt")
    assert nanomorph(*argv, "--ratio-max", "1.333").returncode == 0
    refused = nanomorph(*argv)
    assert refused.returncode == 2 and "ratio_max: 1.333 -> 1.0" in refused.stderr


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_precision_is_used_and_recorded(tmp_path: Path, precision: str) -> None:
    """--precision fp32 | bf16 both train (bf16 autocast runs on any CPU) and say so in
    config.yaml and the model card."""
    out = tmp_path / precision
    argv = ["pretrain", "--data", str(_dataset(tmp_path / "unlabeled")), "--out", str(out), *TINY]
    assert nanomorph(*argv, "--epochs", "1", "--precision", precision).returncode == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["precision"] == precision and config["precision_used"] == precision
    epochs = [r for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "epoch"]
    assert len(epochs) == 1 and np.isfinite(epochs[0]["loss"])
    assert f"| arithmetic | {precision}" in (out / "README.md").read_text()


def test_user_errors_are_one_clear_line(tmp_path: Path) -> None:
    run = nanomorph("pretrain", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "r"), *TINY)
    assert run.returncode == 2
    assert "nothing" in run.stderr
    data = _dataset(tmp_path / "few", n=3)
    run = nanomorph("pretrain", "--data", str(data), "--out", str(tmp_path / "r"), *TINY)
    assert run.returncode == 2
    assert "--batch-size" in run.stderr
    run = nanomorph(
        "pretrain", "--data", str(data), "--out", str(tmp_path / "r"), *TINY, "--ratio-max", "0.5"
    )
    assert run.returncode == 2 and "--ratio-max" in run.stderr
    run = nanomorph("pretrain", "--data", str(data), "--out", str(tmp_path / "r"), *TINY, "--lr-floor", "2")
    assert run.returncode == 2 and "--lr-floor" in run.stderr
    for flags in (
        ["--local-views", "-1"],
        ["--local-views", "2", "--local-size", "64"],
        ["--local-views", "0", "--local-size", "16"],
    ):
        run = nanomorph("pretrain", "--data", str(data), "--out", str(tmp_path / "r"), *TINY, *flags)
        assert run.returncode == 2 and flags[-2] in run.stderr, run.stderr


def test_lr_floor_one_without_warmup_is_the_plain_loops_constant_lr(tmp_path: Path) -> None:
    """``--warmup-epochs 0 --lr-floor 1``: every step at the resolved lr (the reference loop's
    schedule); the default warms up and decays below it."""
    data = _dataset(tmp_path / "unlabeled")
    step_lrs = {}
    for name, extra in (("constant", ["--warmup-epochs", "0", "--lr-floor", "1"]), ("cosine", [])):
        out = tmp_path / name
        argv = ["pretrain", "--data", str(data), "--out", str(out), *TINY, "--epochs", "3", *extra]
        assert nanomorph(*argv).returncode == 0
        lr = yaml.safe_load((out / "config.yaml").read_text())["resolved"]["lr"]
        step_lrs[name] = [r["lr"] / lr for r in read_metrics(out / "metrics.jsonl") if "kind" not in r]
    constant = step_lrs["constant"]
    assert len(constant) >= 2 and constant == pytest.approx([1.0] * len(constant))
    assert min(step_lrs["cosine"]) < 0.9


def test_nan_loss_stops_with_a_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import training.ssl

    monkeypatch.setattr(training.ssl.SSLLoss, "forward", lambda self, a, b: (a * float("nan")).sum())
    data = _dataset(tmp_path / "d", n=8)
    out = tmp_path / "nan"
    run = nanomorph("pretrain", "--data", str(data), "--out", str(out), *TINY, "--epochs", "1")
    assert run.returncode == 2
    err = run.stderr
    assert "loss became nan" in err and "--resume" in err
    assert not (out / "backbone.safetensors").exists()


def test_killed_run_resumes_to_the_same_end(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "unlabeled")
    out = tmp_path / "run"
    cmd = nanomorph_argv("pretrain", "--data", data, "--out", out)  # a real process: it is killed
    cmd += [*TINY, "--epochs", "4", "--crops-per-image", "4", "--method", "simclr"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint.pt").exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint after 240 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # no chance to clean up: like a power cut or OOM kill
    finally:
        proc.wait(timeout=30)
    interrupted_at = load_checkpoint(out / "checkpoint.pt")["epoch"]
    assert 1 <= interrupted_at < 4 and not (out / "backbone.safetensors").exists()

    # Without --resume the unfinished run is protected.
    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert again.returncode == 2 and "--resume" in again.stderr

    resumed = subprocess.run([*cmd, "--resume"], env=_env(), capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {out} after epoch {interrupted_at}/4" in resumed.stderr
    records = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in records if r.get("kind") == "epoch"] == [1, 2, 3, 4]
    steps = [r["step"] for r in records if "kind" not in r]
    assert steps == sorted(set(steps)), "an interrupted epoch's step records must not stay behind"
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 4
    _, meta = load_backbone(out)
    assert meta["epochs"] == "4"


def test_ddp_two_gloo_processes(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "unlabeled")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "nanomorph.cli", "pretrain", "--data", str(data), "--out", str(out), *TINY]
    cmd += ["--epochs", "1", "--steps-per-epoch", "2", "--device", "cpu", "--batch-size", "4"]
    cmd += ["--local-views", "2"]  # views of two sides in one forward call per step, as DDP needs
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["world_size"] == 2 and config["resolved"]["global_batch"] == 8
    assert (config["resolved"]["local_views"], config["resolved"]["local_size"]) == (2, 21)  # 2/3 of 32
    assert "multi-crop: 2 local views of 21 px" in result.stderr
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["global_step"] == 2 and len(ckpt["rng"]) == 2  # both ranks' RNG states
    epochs = [r for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "epoch"]
    assert len(epochs) == 1 and np.isfinite(epochs[0]["loss"])  # only rank 0 wrote
    assert json.loads(ckpt["run"])["global_batch"] == 8


def test_noise_false_takes_only_the_noise_out_of_the_augmentations() -> None:
    """``--noise false``: flat crops stay flat (no read-out or shot noise); the rest of the recipe stays."""
    from training.augment import BatchAugment
    from training.pretrain import augment_config

    settings = {"image_size": 32, "scale_min": 0.5, "scale_max": 1.0, "ratio_max": 1.0}
    noisy, clean = augment_config({**settings, "noise": True}), augment_config({**settings, "noise": False})
    assert noisy.p_gauss_noise > 0 and noisy.p_poisson_noise > 0
    assert (clean.p_gauss_noise, clean.p_poisson_noise) == (0.0, 0.0)
    assert {**clean.to_dict(), "p_gauss_noise": 0, "p_poisson_noise": 0} == {
        **noisy.to_dict(), "p_gauss_noise": 0, "p_poisson_noise": 0
    }  # fmt: skip
    flat = torch.full((64, 1, 48, 48), 0.5)
    clean_std = BatchAugment(clean, torch.Generator().manual_seed(0))(flat).std(dim=(1, 2, 3))
    noisy_std = BatchAugment(noisy, torch.Generator().manual_seed(0))(flat).std(dim=(1, 2, 3))
    assert float(clean_std.max()) < 1e-4 and float(noisy_std.max()) > 0.01


def test_rot90_false_and_gamma_zero_take_only_those_out_of_the_augmentations() -> None:
    """``--rot90 false``: an asymmetric pattern keeps its orientation under every draw (flips aside);
    ``--gamma 0``: no gamma exponent; the rest of the recipe stays."""
    from training.augment import AugmentConfig, BatchAugment
    from training.pretrain import augment_config

    settings = {"image_size": 32, "scale_min": 1.0, "scale_max": 1.0, "ratio_max": 1.0, "noise": False}
    default = augment_config({**settings, "rot90": True, "gamma": 0.3})
    fixed = augment_config({**settings, "rot90": False, "gamma": 0.0})
    assert (default.p_rot90, default.gamma) == (AugmentConfig.p_rot90, 0.3)
    assert (fixed.p_rot90, fixed.gamma) == (0.0, 0.0)
    assert {**fixed.to_dict(), "p_rot90": 0, "gamma": 0} == {**default.to_dict(), "p_rot90": 0, "gamma": 0}
    # --resize-first reaches the recipe; a run saved before it existed made views from native px.
    assert augment_config({**settings, "resize_first": True}).resize_first is True
    assert augment_config(settings).resize_first is False
    # A horizontal bar: rotations by 90 degrees make it vertical, flips keep it horizontal.
    bar = torch.zeros(64, 1, 32, 32)
    bar[:, :, 14:18, 4:28] = 1.0

    def vertical(recipe: AugmentConfig) -> int:
        out = BatchAugment(recipe, torch.Generator().manual_seed(0))(bar)
        rows, cols = out.mean(dim=3), out.mean(dim=2)  # (B, 1, 32) profiles
        return int((rows.amax(dim=(1, 2)) < cols.amax(dim=(1, 2))).sum())

    assert vertical(fixed) == 0 and vertical(default) > 16


def test_local_views_keep_the_global_views_magnification() -> None:
    """``--local-views``: the global recipe at the local side, its crop area shrunk by the square of
    the side ratio (a particle spans as many px in a local view as in a global one); none in runs
    saved before the setting existed."""
    from training.pretrain import augment_config, local_augment_config

    settings = {"image_size": 32, "scale_min": 0.5, "scale_max": 1.0, "ratio_max": 1.0}
    assert local_augment_config(settings) is None
    assert local_augment_config({**settings, "local_views": 0, "local_size": 0}) is None
    local = local_augment_config({**settings, "local_views": 4, "local_size": 16})
    assert local is not None and local.image_size == 16 and local.scale == (0.125, 0.25)
    assert {**local.to_dict(), "image_size": 0, "scale": 0} == {
        **augment_config(settings).to_dict(), "image_size": 0, "scale": 0
    }  # fmt: skip


@pytest.mark.parametrize("method", ["simclr", "barlowtwins"])
def test_forward_step_with_local_views(method: str) -> None:
    """Two global and N local views in one step: features of all views (the first global view's
    first), one finite loss that differs from the two-view loss of the same batch; for each
    objective, since both take the local views' pairs."""
    from training.augment import AugmentConfig, BatchAugment
    from training.backbones import create_backbone
    from training.pretrain import build_ssl_model, forward_step
    from training.ssl import SSLLoss, resolve_config

    torch.manual_seed(0)
    cfg = resolve_config(method, projector="32-16")
    model = build_ssl_model(create_backbone(ARCH), cfg, torch.device("cpu"))
    x = torch.rand(4, 1, 40, 40)
    glob = BatchAugment(AugmentConfig(image_size=32), torch.Generator().manual_seed(0))
    local = BatchAugment(AugmentConfig(image_size=16, scale=(0.125, 0.25)), torch.Generator().manual_seed(1))
    h, loss = forward_step(model, SSLLoss(cfg), glob, x, False, local, 3)
    assert h.shape[0] == (2 + 3) * 4 and torch.isfinite(loss)
    _, two_view = forward_step(model, SSLLoss(cfg), glob, x, False)
    assert torch.isfinite(two_view) and not torch.isclose(loss, two_view)
