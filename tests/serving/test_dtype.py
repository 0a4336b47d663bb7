"""`dtype: auto` picks bf16 on a CPU only where the hardware multiplies bf16 (AVX512-BF16 or AMX)."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from serving.base_model import cpu_has_native_bf16, resolve_dtype

CPUINFO = Path("/proc/cpuinfo")


def _cpu_flags() -> set[str]:
    for line in CPUINFO.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(
    platform.machine() != "x86_64" or not CPUINFO.is_file(), reason="reads the x86 CPU flags from /proc/cpuinfo"
)
def test_native_bf16_follows_the_cpu_flags_not_onednn_emulation() -> None:
    flags = _cpu_flags()
    in_hardware = "avx512_bf16" in flags or "amx_bf16" in flags
    # oneDNN says yes on any AVX-512 CPU (it emulates bf16 there, ~3x slower than fp32): that must not count.
    assert cpu_has_native_bf16() is in_hardware
    expected = torch.bfloat16 if in_hardware else torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) is expected


def test_an_explicit_dtype_is_kept() -> None:
    assert resolve_dtype("float32", torch.device("cpu")) is torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
