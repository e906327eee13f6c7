"""--keep_freed_host_memory: glibc keeps what a CPU step frees, so the next step does not fault it in again."""

import logging
import platform
import subprocess
import sys

import pytest

from zeroconv.train import host_memory
from zeroconv.train.host_memory import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, keep_freed_host_memory


@pytest.fixture
def mallopt_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "glibc_mallopt", lambda: lambda param, value: calls.append((param, value)) or 1)
    return calls


@pytest.mark.parametrize("requested, device, applied", [
    (None, "cpu", True),     # auto: CPU training
    (None, "cuda", False),   # auto: a GPU's tensors are CUDA's caching allocator's
    (True, "cuda", True),    # as given
    (False, "cpu", False),
])
def test_auto_keeps_freed_memory_on_cpu_only(mallopt_calls, requested, device, applied):
    assert keep_freed_host_memory(requested, device) is applied
    assert mallopt_calls == ([(M_MMAP_THRESHOLD, host_memory.MMAP_THRESHOLD),
                              (M_TRIM_THRESHOLD, host_memory.TRIM_THRESHOLD)] if applied else [])


def test_another_c_library_trains_unchanged_with_a_notice(monkeypatch, caplog):
    monkeypatch.setattr(host_memory, "glibc_mallopt", lambda: None)
    with caplog.at_level(logging.INFO, logger="zeroconv.train"):
        assert keep_freed_host_memory(None, "cpu") is False
    assert "no glibc mallopt" in caplog.text


FAULTS = """
import resource, sys, torch
from zeroconv.train.host_memory import keep_freed_host_memory
if sys.argv[1] == "on":
    assert keep_freed_host_memory(True, "cpu")
torch.ones(2**24)  # a 64 MiB buffer (the 256 px condition encoder's at batch 16), allocated and freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.ones(2**24)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's thresholds")
def test_a_buffer_freed_and_allocated_again_is_not_faulted_in_again():
    """20 rounds of a 64 MiB buffer, above the 32 MiB where glibc's own threshold stops rising: by default it is
    mapped anew each round (16,384 page faults a round); kept, a few rounds' faults in all."""
    def faults(mode):
        return int(subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True,
                                  check=True).stdout)

    default, kept = faults("off"), faults("on")
    assert default > 20 * 8192, default
    # measured 327,700 by default; kept, 16,384 to 114,689: one round, and a few more where the kernel reclaims
    # idle pages (this VM's DAMON reclaim) and they fault back
    assert kept < default / 2, (kept, default)
