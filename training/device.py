"""The one device picker of every training command (``--device auto | cpu | cuda | cuda:N``)."""

from __future__ import annotations

import torch


def pick_device(requested: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: CUDA when present (``cuda:local_rank``), else CPU; ``cpu`` / ``cuda`` / ``cuda:N``
    force a device. CUDA is tested one way, :func:`torch.cuda.is_available`.

    Args:
        requested: the ``--device`` value (``None`` or empty means ``auto``).
        local_rank: this process's GPU under torchrun, used for ``auto`` and a bare ``cuda``.

    Raises:
        ValueError: CUDA asked for but not available, a GPU index this machine lacks, or an
            unknown device name; the message names the ``--device`` value.
    """
    name = str(requested or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device: unknown device {name!r} (auto, cpu, cuda or cuda:N)") from exc
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    index = local_rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)
