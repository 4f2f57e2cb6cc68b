"""Process settings of model jobs: the glibc allocator thresholds behind the passes' page faults,
and one heap for all threads."""

from __future__ import annotations

import ctypes
import platform
import subprocess
import sys

import pytest

from qbreak import runtime

# In a fresh interpreter: bytes glibc serves by mmap before and after a 12 MB tensor (mallinfo2).
PROBE = """
import ctypes, sys, torch
from qbreak import runtime
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "configure":
    runtime.configure(1)
before = libc.mallinfo2().hblkhd
buffer = torch.empty(3 << 20)  # 12 MB of float32: activation-sized, under the 16 MB threshold
print(libc.mallinfo2().hblkhd - before)
"""

GLIBC = runtime._libc() is not None and hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")


def _mmapped_bytes(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt/mallinfo2 are what is under test")
def test_configure_serves_activation_buffers_from_the_heap() -> None:
    assert _mmapped_bytes("plain") >= 12 << 20  # glibc's default: a fresh mapping (faults on every use)
    assert _mmapped_bytes("configure") == 0  # after the job's configure: the reusable heap


# In a fresh interpreter: the heaps (arenas) glibc has after another thread allocated a tensor.
ARENAS = """
import ctypes, sys, tempfile, threading, torch
from qbreak import runtime
if sys.argv[1] == "configure":
    runtime.configure(1)
kept = []
worker = threading.Thread(target=lambda: kept.append(torch.ones(1 << 18)))
worker.start()
worker.join()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
with tempfile.NamedTemporaryFile(suffix=".xml") as report:
    stream = libc.fopen(report.name.encode(), b"w")
    libc.malloc_info(0, ctypes.c_void_p(stream))
    libc.fclose(ctypes.c_void_p(stream))
    print(open(report.name).read().count("<heap nr="))
"""


def _arenas(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", ARENAS, mode], capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt/malloc_info are what is under test")
def test_configure_keeps_every_thread_on_one_heap() -> None:
    assert _arenas("plain") >= 2  # glibc's default: the worker thread got a heap of its own
    assert _arenas("configure") == 1


ROUNDING = {0xC00: "rounds toward zero", 0x400: "rounds downward", 0x800: "rounds upward"}  # glibc x86-64 FE_*


@pytest.mark.skipif(platform.machine() != "x86_64" or not GLIBC, reason="glibc's x86-64 FE_* rounding constants")
def test_float_environment_faults_names_each_departure_and_the_reset_undoes_it() -> None:
    import torch

    libm = ctypes.CDLL("libm.so.6")
    assert runtime.float_environment_faults() == []
    try:
        for mode, fault in ROUNDING.items():
            libm.fesetround(mode)
            assert runtime.float_environment_faults() == [fault]
            libm.fesetround(0)
        torch.set_flush_denormal(True)
        assert runtime.float_environment_faults() == [
            "flushes subnormal results to zero", "reads subnormal inputs as zero"
        ]
        libm.fesetround(0x400)
        runtime.ensure_default_float_environment("test")
        assert runtime.float_environment_faults() == []
    finally:
        libm.fesetround(0)
        torch.set_flush_denormal(False)


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("gpu", "config key runtime.device: expected cpu, cuda or cuda:N, got 'gpu'"),
        ("cuda:x", "config key runtime.device: expected cpu, cuda or cuda:N, got 'cuda:x'"),
    ],
)
def test_a_bad_device_is_one_line_naming_the_key(device: str, message: str) -> None:
    with pytest.raises(runtime.QbreakError) as info:
        runtime.check_device(device)
    assert str(info.value) == message


def test_cuda_without_a_gpu_stops_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    runtime.check_device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(runtime.QbreakError, match=r"^config key runtime.device: cuda:1 asked for, but torch .* sees no CUDA GPU here$"):
        runtime.check_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    runtime.check_device("cuda:0")
    with pytest.raises(runtime.QbreakError, match=r"^config key runtime.device: cuda:1 asked for, but only 1 GPU\(s\) here$"):
        runtime.check_device("cuda:1")
