"""--mixed_precision auto: bf16 where the hardware has it and it measured faster, accelerate's setting first."""

import pytest
import torch

from zeroconv.models import dtypes


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def with_cpu_bf16(monkeypatch, native: bool):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)


@pytest.mark.parametrize("native, resolution, expected", [
    (True, 256, "bf16"), (True, 512, "bf16"),
    (True, 64, "no"),  # the tiny base: bf16 measured no faster there
    (False, 512, "no"),  # emulated bf16 is slower than fp32
])
def test_auto_on_cpu_takes_bf16_only_where_native_and_large_enough(cpu_only, monkeypatch, native, resolution,
                                                                    expected):
    with_cpu_bf16(monkeypatch, native)
    assert dtypes.resolve_mixed_precision("auto", resolution) == expected


def test_auto_on_cuda_follows_the_gpu(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert dtypes.resolve_mixed_precision("auto", 64) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # before Ampere: fp32, never fp16
    assert dtypes.resolve_mixed_precision("auto", 512) == "no"


def test_auto_defers_to_accelerate_launch(cpu_only, monkeypatch):
    with_cpu_bf16(monkeypatch, True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert dtypes.resolve_mixed_precision("auto", 512) == "no"


def test_an_explicit_choice_wins_and_fp16_falls_back_on_cpu(cpu_only, monkeypatch):
    with_cpu_bf16(monkeypatch, True)
    assert dtypes.resolve_mixed_precision("no", 512) == "no"
    assert dtypes.resolve_mixed_precision("bf16", 64) == "bf16"
    assert dtypes.resolve_mixed_precision("fp16", 512) == "no"
