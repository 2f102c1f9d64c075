"""training.device.pick_precision: the one --precision picker (auto | fp32 | bf16)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training import device as device_lib
from training.device import cpu_has_amx_bf16, pick_precision

AMX_FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
NO_AMX_FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"


@pytest.mark.parametrize(("text", "expected"), [(AMX_FLAGS, True), (NO_AMX_FLAGS, False)])
def test_amx_is_read_from_the_cpu_flags(tmp_path: Path, text: str, expected: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    assert cpu_has_amx_bf16(cpuinfo) is expected


def test_no_cpuinfo_means_no_amx(tmp_path: Path) -> None:
    assert cpu_has_amx_bf16(tmp_path / "missing") is False


@pytest.mark.parametrize(("amx", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_on_cpu_follows_amx(monkeypatch: pytest.MonkeyPatch, amx: bool, expected: str) -> None:
    monkeypatch.setattr(device_lib, "cpu_has_amx_bf16", lambda: amx)
    assert pick_precision("auto", torch.device("cpu")) == expected
    assert pick_precision(None, torch.device("cpu")) == expected


def test_auto_on_cuda_is_bf16() -> None:
    assert pick_precision("auto", torch.device("cuda", 0)) == "bf16"


@pytest.mark.parametrize("forced", ["fp32", "bf16", " BF16 "])
def test_forced_values_win(monkeypatch: pytest.MonkeyPatch, forced: str) -> None:
    monkeypatch.setattr(device_lib, "cpu_has_amx_bf16", lambda: True)
    assert pick_precision(forced, torch.device("cpu")) == forced.strip().lower()


def test_unknown_value_names_the_flag() -> None:
    with pytest.raises(ValueError, match=r"--precision: unknown value 'fp16'"):
        pick_precision("fp16", torch.device("cpu"))
