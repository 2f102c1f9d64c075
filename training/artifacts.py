"""The project's trained artefacts: where an encoder comes from, and the safetensors files we write.

One place answers "how is an encoder loaded" and "how is a weights file read or written":

* :func:`resolve_encoder_source` turns an ``--encoder`` value into an :class:`EncoderSource`:
  ``scratch``, a pretraining run folder or its ``backbone.safetensors``, ``imagenet[@ARCH]`` or a
  foreign checkpoint ``FILE[@ARCH]`` (docs/encoders.md);
* :func:`run_weights` finds the weights file of a run folder (or takes the file itself);
* :func:`write_weights` / :func:`read_weights` / :func:`read_metadata` are the one writer and the one
  reader of our safetensors formats (backbone, classifier, segmenter): string metadata, the format
  tag, the git commit, required keys checked, errors naming the file; :func:`contract_of` reads the
  preprocessing :class:`~nanomorph.contract.Contract` a file records;
* :func:`sha256_file` (from ``nanomorph.store``, which verifies stored models with it) is the one
  digest of a file.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nanomorph.atomic import atomic_path
from nanomorph.contract import Contract
from nanomorph.store import sha256_file

__all__ = [
    "BACKBONE_FILE",
    "BACKBONE_FORMAT",
    "CLASSIFIER_FILE",
    "CLASSIFIER_FORMAT",
    "SEGMENTER_FILE",
    "SEGMENTER_FORMAT",
    "EncoderSource",
    "contract_of",
    "git_commit",
    "read_metadata",
    "read_weights",
    "resolve_encoder_source",
    "run_weights",
    "sha256_file",
    "write_weights",
]

log = logging.getLogger(__name__)

BACKBONE_FORMAT = "nanomorph-backbone/1"
CLASSIFIER_FORMAT = "nanomorph-classifier/1"
SEGMENTER_FORMAT = "nanomorph-segmenter/1"
BACKBONE_FILE = "backbone.safetensors"
CLASSIFIER_FILE = "classifier.safetensors"
SEGMENTER_FILE = "segmenter.safetensors"
DEFAULT_ARCH = "resnet18"
# Foreign checkpoints (CEM500K, DINOv2, timm) loaded by training.backbones.load_init_checkpoint.
_TORCH_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".ckpt")


def git_commit() -> str:
    """The source tree's commit (``unknown`` outside a git checkout), for provenance."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ------------------------------------------------------------------------------ safetensors I/O


def write_weights(
    weights: nn.Module | Mapping[str, torch.Tensor],
    path: str | Path,
    metadata: Mapping[str, Any],
    fmt: str,
    required: Iterable[str] = ("architecture",),
) -> Path:
    """Writes a state dict (or a module's) with string metadata, atomically.

    Non-string metadata values are JSON-encoded; ``format`` (``fmt`` unless the metadata names its
    own) and ``git_commit`` are added. Every key of ``required`` must be present.
    """
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"format": fmt, "git_commit": git_commit()}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    for key in required:
        if key not in meta:
            raise ValueError(f"{path}: {meta['format']} metadata needs {key!r}")
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """String metadata of a safetensors file, without loading tensors; errors name the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types on a damaged file
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc


def read_weights(
    path: str | Path, fmt: str | None = None, required: Iterable[str] = ()
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state dict, metadata)`` of a safetensors file.

    ``fmt`` (if given) must be the file's ``format`` and every key of ``required`` must be in its
    metadata; otherwise a ValueError names the file and what it is.
    """
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_metadata(path)
    kind = (fmt or "nanomorph-weights/1").split("/")[0].replace("-", " ")
    if fmt is not None and meta.get("format") != fmt:
        raise ValueError(f"{path}: not a {kind} (format {meta.get('format')!r})")
    missing = [key for key in required if key not in meta]
    if missing:
        raise ValueError(f"{path}: not a {kind} (no {', '.join(map(repr, missing))} metadata)")
    try:
        return load_file(str(path)), meta
    except Exception as exc:  # a damaged tensor section after a readable header
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc


def contract_of(meta: Mapping[str, str], where: str | Path) -> Contract:
    """The preprocessing contract a weights file records (older files: only ``image_size``)."""
    try:
        if meta.get("contract"):
            return Contract.from_json(meta["contract"])
        return Contract(image_size=int(meta.get("image_size", 224)))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: bad contract in its metadata ({exc})") from exc


def run_weights(path: str | Path, name: str, flag: str) -> tuple[Path, Path]:
    """``(run folder, weights file)`` from a run folder or the weights file ``name`` itself."""
    path = Path(path)
    weights = path / name if path.is_dir() else path
    if not weights.is_file():
        hint = " (is the run unfinished?)" if path.is_dir() else ""
        raise FileNotFoundError(f"{flag} {path}: {weights} does not exist{hint}")
    return weights.parent, weights


# ------------------------------------------------------------------------------- encoder sources


@dataclass(frozen=True)
class EncoderSource:
    """Where an encoder comes from: ``kind`` is ``scratch``, ``run`` (a nanomorph backbone file,
    ``path``, with its ``meta``), ``imagenet`` (timm's weights) or ``checkpoint`` (a foreign file,
    ``path``), and the timm ``architecture`` it is built as."""

    kind: str
    architecture: str
    path: Path | None = None
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def init(self) -> str | None:
        """What ``training.backbones.create_backbone`` starts from (None: scratch or a run file)."""
        if self.kind == "imagenet":
            return "imagenet"
        return str(self.path) if self.kind == "checkpoint" else None

    @property
    def method(self) -> str:
        """The pretraining method, as run folders and model cards record it."""
        if self.kind == "run":
            return self.meta.get("method", "unknown")
        return {"scratch": "none", "imagenet": "imagenet", "checkpoint": "checkpoint"}[self.kind]

    @property
    def contract(self) -> Contract | None:
        """The contract a pretraining run recorded (None for the other kinds)."""
        return contract_of(self.meta, self.path or "") if self.kind == "run" else None

    def build(self) -> nn.Module:
        """A fresh backbone: random (seed it first), ImageNet, the checkpoint, or the run's weights."""
        from training.backbones import create_backbone, load_backbone

        if self.kind == "run":
            assert self.path is not None
            return load_backbone(self.path)[0]
        return create_backbone(self.architecture, self.init or "none")


def _is_foreign_checkpoint(path: Path) -> bool:
    """A weights file that is not a nanomorph backbone: a torch checkpoint (``.pth``, ``.pth.tar``,
    ``.pt``, ``.bin``, ``.ckpt``) or a safetensors file without nanomorph metadata (timm hub)."""
    if not path.is_file():
        return False
    if path.suffix == ".safetensors":
        return "architecture" not in read_metadata(path)  # nanomorph's own files always name it
    return path.suffix in _TORCH_SUFFIXES


def resolve_encoder_source(
    encoder: str | Path, arch: str | None = None, flag: str = "--encoder"
) -> EncoderSource:
    """Parses an encoder source (docs/encoders.md) without building the network.

    Args:
        encoder: ``scratch``, ``RUNS/X`` or ``RUNS/X/backbone.safetensors``, ``imagenet[@ARCH]`` or
            ``FILE[@ARCH]`` (a foreign checkpoint). A whole string that is an existing path is a
            path even if it holds an ``@``.
        arch: the architecture for scratch / imagenet / a checkpoint without ``@ARCH`` (default
            resnet18); a run names its own (``EncoderSource.architecture``).
        flag: the option named in error messages.
    """
    text = str(encoder)
    if text.lower() == "scratch":
        return EncoderSource("scratch", arch or DEFAULT_ARCH)
    split_arch = "@" in text and not Path(text).exists()
    source, at, arch_given = text.rpartition("@") if split_arch else (text, "", "")
    if source.lower() == "imagenet":
        return EncoderSource("imagenet", arch_given or arch or DEFAULT_ARCH)
    if _is_foreign_checkpoint(Path(source)):
        return EncoderSource("checkpoint", arch_given or arch or DEFAULT_ARCH, Path(source))
    if at:
        raise ValueError(f"{flag} {text}: @ARCH goes with imagenet or a checkpoint file, not a nanomorph run")
    path = Path(text)
    file = path / BACKBONE_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"{flag} {text}: {file} does not exist (a backbone.safetensors, its run folder, "
            "scratch, imagenet[@ARCH] or a checkpoint FILE[@ARCH])"
        )
    meta = read_metadata(file)
    if "architecture" not in meta:
        raise ValueError(f"{file}: not a nanomorph backbone (no 'architecture' metadata)")
    return EncoderSource("run", meta["architecture"], file, meta)
