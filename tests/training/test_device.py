"""training.device.pick_device: the one --device picker (auto | cpu | cuda | cuda:N)."""

from __future__ import annotations

import pytest
import torch

from training.device import pick_device


def _cuda(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("value", ["auto", None, "", "AUTO"])
def test_auto_is_cpu_without_cuda(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    _cuda(monkeypatch, 0)
    assert pick_device(value) == torch.device("cpu")


def test_auto_takes_this_process_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _cuda(monkeypatch, 2)
    assert pick_device("auto") == torch.device("cuda", 0)
    assert pick_device("auto", local_rank=1) == torch.device("cuda", 1)


def test_forced_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    _cuda(monkeypatch, 2)
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(" CPU ") == torch.device("cpu")
    assert pick_device("cuda") == torch.device("cuda", 0)
    assert pick_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert pick_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize("value", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_asked_for_but_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    _cuda(monkeypatch, 0)
    with pytest.raises(ValueError, match=r"--device cuda.*CUDA is not available on this machine"):
        pick_device(value)


def test_gpu_index_the_machine_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    _cuda(monkeypatch, 1)
    with pytest.raises(ValueError, match=r"--device cuda:3: this machine has 1 CUDA device"):
        pick_device("cuda:3")


def test_unknown_device_name() -> None:
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        pick_device("gpu0")
