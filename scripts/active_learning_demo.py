"""Active-learning demo: do suggested images beat random picks at equal label budgets?

On synthetic nanowire images (:func:`nanomorph.synth.generate`, 5 morphology classes) this:

1. writes a labeled *pool* (the oracle: labels are revealed only for picked images) and a separate
   *test* set (other seed, never picked from);
2. builds an embed model and stores it in a folder store, then embeds everything through
   :class:`nanomorph.runtime.Embedder` (onnxruntime), exactly as ``nanomorph suggest`` does:

   * ``random-init``: a randomly initialised timm ``resnet18`` (``training.backbones``) exported
     with ``training.export`` -- a legitimate "random features" encoder, no training at all;
   * ``shallow``: the same random network cut after ``layer2``, mean+std pooled (random texture
     statistics, which keep more information than deep random features);
   * ``simclr`` (with ``--pretrain-epochs N > 0``): ``nanomorph pretrain`` (SimCLR) on the pool's
     unlabeled images for N epochs, then exported the same way;

3. for every budget and seed (the seed picks a random 80 % of the pool and the random picks),
   selects images with ``random``, ``diversity`` (k-center greedy, :func:`nanomorph.archive.suggest.select`)
   and ``hybrid`` (rounds of 5: uncertainty of a nearest-centroid classifier trained on the labels
   so far, then k-center inside the 4x most uncertain), and reports the test accuracy of a
   nearest-centroid classifier and of an L2-regularised logistic regression on the embeddings,
   mean +- std over the seeds; plus how many of the 5 classes the picks contain.

The table goes to stdout, ``OUT/results.json`` and (``--write-docs``) the "## Active learning"
section of docs/results.md. Run (about 1-3 minutes on 2 CPU cores)::

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/active_learning_demo.py --out /tmp/al-demo --write-docs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nanomorph.archive.suggest import k_center_greedy, select, uncertainty_scores  # noqa: E402
from nanomorph.contract import Contract, list_images, read_image  # noqa: E402
from nanomorph.synth import CLASSES, generate  # noqa: E402

SECTION = "## Active learning"
STRATEGIES = ("random", "diversity", "hybrid")


# ------------------------------------------------------------------------------------------ encoders


def random_encoder(work: Path, store: Path, image_size: int) -> str:
    """A random-init resnet18 saved as a backbone run and exported to the store; returns its tag."""
    import torch

    from training.backbones import create_backbone, save_backbone
    from training.export import export_runs

    run = work / "run-random"
    if not (run / "backbone.safetensors").is_file():
        torch.manual_seed(0)
        model = create_backbone("resnet18")
        contract = Contract(image_size=image_size)
        save_backbone(
            model,
            run / "backbone.safetensors",
            {
                "architecture": "resnet18",
                "in_chans": "1",
                "method": "none",
                "image_size": str(image_size),
                "contract": contract.to_json(),
                "epochs": "0",
                "embedding_dim": str(model.num_features),
            },
        )
    return export_runs(encoder=run, name="al-random", version="1", store=store)["embed"]


def shallow_random_encoder(work: Path, store: Path, image_size: int) -> str:
    """The stem, layer1 and layer2 of the same random-init resnet18 with mean+std pooling of the
    feature maps (random texture statistics, 256-d), exported with ``training.export``'s ONNX
    exporter and stored; returns its tag. Deep random features collapse to nearly one direction;
    shallow ones keep more of the image statistics."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from nanomorph.store import metadata_props, save_model
    from training.backbones import create_backbone
    from training.export import ExportJob, export_onnx, set_metadata

    tag = "al-shallow-embed:1"
    if (store / "al-shallow-embed" / "1" / "manifest.json").is_file():
        return tag

    class Shallow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            r = create_backbone("resnet18")
            parts = ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2")
            self.body = nn.Sequential(*(r.get_submodule(name) for name in parts))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.body(x)
            return F.normalize(torch.cat([h.mean(dim=(2, 3)), h.std(dim=(2, 3))], dim=1), dim=1)

    contract = Contract(image_size=image_size)
    job = ExportJob("embed", Shallow().eval(), ["embedding"], contract, work, work / "none")
    onnx_path = export_onnx(job, work / "shallow.onnx")
    encoder = {"method": "none", "architecture": "resnet18[:layer2]+mean/std pooling"}
    set_metadata(
        onnx_path, metadata_props("embed", contract, encoder=encoder, provenance={"script": __file__})
    )
    save_model(onnx_path, store, tag, "embed", {"readme": f"# {tag}\n\nRandom shallow features (demo).\n"})
    return tag


def pretrained_encoder(work: Path, store: Path, data: Path, image_size: int, epochs: int) -> str:
    """``nanomorph pretrain`` (SimCLR, CPU) on ``data`` for ``epochs``, then exported; returns its tag."""
    run = work / f"run-simclr-{epochs}"
    if not (run / "backbone.safetensors").is_file():
        cmd = [
            sys.executable, "-m", "nanomorph.cli", "pretrain", "--data", str(data), "--out", str(run),
            "--method", "simclr", "--backbone", "resnet18", "--image-size", str(image_size),
            "--batch-size", "32", "--epochs", str(epochs), "--device", "cpu", "--workers", "0",
            "--warmup-epochs", "1", "--optimizer", "adamw", "--base-lr", "0.02",  # as the default model
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        subprocess.run(cmd, check=True, env=env, cwd=REPO)
    return export_runs_tag(run, store, f"al-simclr{epochs}")


def export_runs_tag(run: Path, store: Path, name: str) -> str:
    from training.export import export_runs

    return export_runs(encoder=run, name=name, version="1", store=store)["embed"]


def embed_folder(tag: str, store: Path, root: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Embeddings of ``root/<class>/*`` with the stored model, and the class index of each."""
    from nanomorph.runtime import Embedder
    from nanomorph.store import resolve

    embedder = Embedder(resolve(tag, store), batch_size=32)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = list_images(root)
    y = np.array([classes.index(p.relative_to(root).parts[0]) for p in files])
    x = np.concatenate(
        [embedder.embed([read_image(p)[0] for p in files[s : s + 64]]) for s in range(0, len(files), 64)]
    )
    return x.astype(np.float32), y, classes


# -------------------------------------------------------------------------------------- classifiers


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def centroid_probs(
    x_lab: np.ndarray, y_lab: np.ndarray, x: np.ndarray, n_classes: int, t: float = 0.05
) -> np.ndarray:
    """Softmax over cosine similarity to class centroids (classes without labels get -inf)."""
    sims = np.full((len(x), n_classes), -np.inf)
    xu = _unit(x)
    for c in np.unique(y_lab):
        cen = _unit(x_lab[y_lab == c].mean(axis=0, keepdims=True))[0]
        sims[:, c] = xu @ cen
    z = (sims - sims.max(axis=1, keepdims=True)) / t
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def logistic_predict(
    x_lab: np.ndarray, y_lab: np.ndarray, x: np.ndarray, n_classes: int, l2: float = 1e-3, steps: int = 300
) -> np.ndarray:
    """Multinomial logistic regression (full-batch gradient descent, standardised features)."""
    mu, sd = x_lab.mean(axis=0), x_lab.std(axis=0) + 1e-6
    a, b = (x_lab - mu) / sd, (x - mu) / sd
    w = np.zeros((a.shape[1], n_classes))
    bias = np.zeros(n_classes)
    onehot = np.eye(n_classes)[y_lab]
    lr = 0.5
    for _ in range(steps):
        z = a @ w + bias
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        g = p - onehot
        w -= lr * (a.T @ g / len(a) + l2 * w)
        bias -= lr * g.mean(axis=0)
    return np.argmax(b @ w + bias, axis=1)


# ---------------------------------------------------------------------------------------- selection


def pick(
    strategy: str, x: np.ndarray, y: np.ndarray, budget: int, n_classes: int, rng: np.random.Generator
) -> list[int]:
    """Indices (into ``x``) of ``budget`` images chosen by ``strategy``; ``y`` is only read for
    images already picked (the oracle answers for labeled images only)."""
    if strategy == "random":
        return [int(i) for i in rng.choice(len(x), budget, replace=False)]
    first = int(rng.integers(len(x)))
    if strategy == "diversity":
        return k_center_greedy(x, budget, first=first)[0]
    # hybrid: a diverse start of one image per class count, then rounds of 5.
    chosen = k_center_greedy(x, min(budget, n_classes), first=first)[0]
    while len(chosen) < budget:
        rest = np.setdiff1d(np.arange(len(x)), chosen)
        probs = centroid_probs(x[chosen], y[chosen], x[rest], n_classes)
        probs = np.where(np.isfinite(probs), probs, 0.0)
        step = min(5, budget - len(chosen))
        got = select(
            x[rest], step, "hybrid", labeled=x[chosen], uncertainty=uncertainty_scores(probs, "margin")
        )
        chosen += [int(rest[g["index"]]) for g in got]
    return chosen


def evaluate(
    x_pool: np.ndarray, y_pool: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, n_classes: int,
    budgets: list[int], seeds: int,
) -> dict[str, Any]:  # fmt: skip
    results: dict[str, Any] = {}
    for strategy in STRATEGIES:
        for budget in budgets:
            nc, lr, cov = [], [], []
            for seed in range(seeds):
                rng = np.random.default_rng(seed)
                sub = np.sort(rng.choice(len(x_pool), int(0.8 * len(x_pool)), replace=False))
                idx = sub[pick(strategy, x_pool[sub], y_pool[sub], budget, n_classes, rng)]
                assert len(set(idx.tolist())) == budget
                xl, yl = x_pool[idx], y_pool[idx]
                p = centroid_probs(xl, yl, x_test, n_classes)
                nc.append(float((np.argmax(p, axis=1) == y_test).mean()))
                lr.append(float((logistic_predict(xl, yl, x_test, n_classes) == y_test).mean()))
                cov.append(len(set(yl.tolist())))
            results[f"{strategy}/{budget}"] = {
                "strategy": strategy,
                "budget": budget,
                "centroid_mean": float(np.mean(nc)),
                "centroid_std": float(np.std(nc)),
                "logreg_mean": float(np.mean(lr)),
                "logreg_std": float(np.std(lr)),
                "classes_covered": float(np.mean(cov)),
            }
    return results


def table(results: dict[str, Any], budgets: list[int], key: str) -> str:
    head = "| strategy | " + " | ".join(f"{b} labels" for b in budgets) + " |"
    lines = [head, "|---|" + "---|" * len(budgets)]
    for s in STRATEGIES:
        cells = []
        for b in budgets:
            r = results[f"{s}/{b}"]
            cells.append(f"{r[key + '_mean']:.3f} ± {r[key + '_std']:.3f} ({r['classes_covered']:.1f})")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_docs(text: str) -> Path:
    """Replaces (or appends) the "## Active learning" section of docs/results.md, nothing else."""
    path = REPO / "docs" / "results.md"
    old = path.read_text(encoding="utf-8") if path.is_file() else "# Results\n"
    start = old.find(SECTION + "\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    else:
        nxt = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text.rstrip("\n") + "\n" + (old[nxt:] if nxt >= 0 else "")
    path.write_text(new, encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/nanomorph-al-demo"), help="work folder")
    ap.add_argument("--n-per-class", type=int, default=40, help="pool images per class")
    ap.add_argument("--n-test", type=int, default=30, help="test images per class")
    ap.add_argument("--size", type=int, default=96, help="image side (px)")
    ap.add_argument("--budgets", default="5,10,15,20,30", help="label budgets, comma list")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--pretrain-epochs", type=int, default=0, help="also a SimCLR encoder (0 = skip)")
    ap.add_argument("--write-docs", action="store_true", help="write docs/results.md '## Active learning'")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    work = args.out
    budgets = [int(b) for b in args.budgets.split(",")]
    n_classes = len(CLASSES["nanowires"])
    generate("nanowires", args.n_per_class, args.size, 0, work / "pool", contact_sheet=False)
    generate("nanowires", args.n_test, args.size, 1, work / "test", n_unlabeled=0, contact_sheet=False)
    store = work / "store"
    encoders = {
        "random-init resnet18 (whole network, 512-d)": random_encoder(work, store, args.size),
        "random-init resnet18 up to layer2, mean+std pooled (256-d)": shallow_random_encoder(
            work, store, args.size
        ),
    }
    if args.pretrain_epochs > 0:
        encoders[f"SimCLR resnet18, {args.pretrain_epochs} epochs on the pool's unlabeled images"] = (
            pretrained_encoder(work, store, work / "pool" / "unlabeled", args.size, args.pretrain_epochs)
        )
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "encoders": {}}
    sections = []
    for label, tag in encoders.items():
        x_pool, y_pool, classes = embed_folder(tag, store, work / "pool" / "classification")
        x_test, y_test, _ = embed_folder(tag, store, work / "test" / "classification")
        res = evaluate(x_pool, y_pool, x_test, y_test, n_classes, budgets, args.seeds)
        report["encoders"][label] = {"tag": tag, "dim": int(x_pool.shape[1]), "results": res}
        gains = "; ".join(
            f"{b} labels: "
            + ", ".join(
                f"{st} {res[f'{st}/{b}']['centroid_mean'] - res[f'random/{b}']['centroid_mean']:+.3f}"
                for st in STRATEGIES[1:]
            )
            for b in budgets
        )
        sections.append(
            f"**Encoder: {label}** (`{tag}`, {x_pool.shape[1]}-d). Nearest-centroid accuracy "
            f"(mean ± std over {args.seeds} seeds; in brackets the mean number of the {n_classes} classes "
            f"among the picks):\n\n{table(res, budgets, 'centroid')}\n\n"
            f"Logistic regression on the same picks:\n\n{table(res, budgets, 'logreg')}\n\n"
            f"Suggested minus random, nearest centroid: {gains}.\n"
        )
        print(f"\n{label} ({tag})\nnearest centroid\n{table(res, budgets, 'centroid')}")
        print(f"logistic regression\n{table(res, budgets, 'logreg')}")
    seconds = time.perf_counter() - t0
    report["seconds"] = round(seconds, 1)
    (work / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.write_docs:
        text = (
            f"{SECTION}\n\n"
            "Do the images `nanomorph suggest` picks beat random picks at equal label budgets? "
            "`scripts/active_learning_demo.py` (reproduce with the command below) uses synthetic nanowire "
            f"images ({args.size} px, {n_classes} classes): a pool of {args.n_per_class} per class (seed 0) "
            f"from which labels are 'bought', and a separate test set of {args.n_test} per class (seed 1). "
            "Each seed draws a random 80 % of the pool and the random picks; `diversity` is k-center greedy "
            "coverage, `hybrid` starts with one diverse pick per class count and then adds rounds of 5 "
            "(margin uncertainty of a nearest-centroid classifier on the labels so far, k-center among the "
            "4x most uncertain). Embeddings come from the stored ONNX model through `nanomorph.runtime`, "
            "as in `nanomorph suggest`.\n\n"
            + "\n".join(sections)
            + "\n**Reading.** The first two encoders are *random* features (`--pretrain-epochs N` adds a "
            "SimCLR encoder pretrained on the pool). With the deep random features every strategy stays near chance "
            "(0.2), so there is nothing for a selection to exploit. With the shallow random texture features "
            "(numbers above, fixed seeds, so a rerun reproduces them) the suggested picks beat random ones at "
            "the budgets in the table by a few points, about one seed-to-seed standard deviation, most at "
            "small budgets where random picks miss classes; at the largest budget the gap is within the spread. "
            "Uncertainty from a nearest-centroid classifier on random features is weak, so `hybrid` "
            "is not reliably better than plain `diversity` here. Expect larger gains with a pretrained encoder "
            "whose embedding clusters follow the classes.\n"
            + f"\nRun time {seconds:.0f} s on the shared 2-core CPU. Reproduce:\n\n"
            "```bash\nHF_HUB_OFFLINE=1 .venv/bin/python scripts/active_learning_demo.py --write-docs"
            + f" --seeds {args.seeds}"
            + (f" --pretrain-epochs {args.pretrain_epochs}" if args.pretrain_epochs else "")
            + "\n```\n"
        )
        print(f"wrote {write_docs(text)}")
    print(f"done in {seconds:.0f} s; {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
