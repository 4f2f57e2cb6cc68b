"""Process-wide settings, applied once at a job's entry point (never at import time)."""

from __future__ import annotations

import ctypes
import functools
import logging
import re
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from qbreak.errors import QbreakError

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "bfloat16", "float16")

log = logging.getLogger(__name__)


def configure(threads: int, seed: int | None = None) -> None:
    """Set torch's thread count to the threads a job was given (oversubscription costs 100×).

    Analysis jobs run without torch (envs/analysis.yaml); there only logging is set up.
    """
    try:
        import torch  # noqa: F401
    except ImportError:  # an analysis environment: nothing to configure
        pass
    else:
        _configure_torch(threads, seed)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _skip_transformers_hqq_import() -> None:
    """Keep transformers from importing hqq when it loads (measured: 2.3 s of every model job's start).

    transformers.cache_utils imports hqq at import time only to offer an HQQ-quantized KV cache, which
    qbreak never uses; qbreak's own HQQ quantizer imports hqq itself. Must run before transformers'
    model code is imported (a job's entry point), else it changes nothing.
    """
    if "transformers.cache_utils" in sys.modules:
        return
    try:
        import transformers.utils as utils
        import transformers.utils.import_utils as import_utils
    except ImportError:
        return

    def unavailable(*args: object, **kwargs: object) -> bool:
        return False

    import_utils.is_hqq_available = utils.is_hqq_available = unavailable


def _configure_torch(threads: int, seed: int | None) -> None:
    import torch

    _skip_transformers_hqq_import()

    tune_allocator()
    torch.set_num_threads(max(1, int(threads)))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process; harmless
        pass
    if seed is not None:
        torch.manual_seed(seed)


def check_device(device: str) -> None:
    """Stop with one line naming config key runtime.device unless it is cpu, or a CUDA device torch
    sees on this machine (a job sent to a node without a GPU, or a typo such as 'gpu')."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise QbreakError(f"config key runtime.device: expected cpu, cuda or cuda:N, got {device!r}")
    if device == "cpu":
        return
    import torch

    if not torch.cuda.is_available():
        raise QbreakError(
            f"config key runtime.device: {device} asked for, but torch {torch.__version__} sees no CUDA GPU here"
        )
    index, count = int(device.partition(":")[2] or 0), torch.cuda.device_count()
    if index >= count:
        raise QbreakError(f"config key runtime.device: {device} asked for, but only {count} GPU(s) here")


def torch_dtype(name: str, device: str) -> torch.dtype:
    """torch dtype of config key runtime.dtype. On a CPU: float32, or bfloat16 where the CPU has AMX
    bfloat16 units (Intel Xeon of the 4th generation or later); half precision anywhere else on a
    CPU is slower than float32, and refused.

    On an Intel host with AMX (2026-12-05, two threads, bench/dtype_speed.py): the 2048² matmul ran
    at 2,353 GFLOP/s in bfloat16 against 297 in float32, the bundled model's NLL pass 3.4x faster
    and the side-by-side FP + RTN W3 pass 3.1x; the FP NLLs moved by 0.012 nats on average (at most
    0.023, 128-token examples), and the examples' quantization errors and KLs kept their order
    (Spearman 0.997 and 0.995, the same top 10%).
    On AMD hosts with AVX-512 BF16 but no AMX, bfloat16 was slower than float32.
    """
    if name not in DTYPES:
        raise QbreakError(f"config key runtime.dtype: expected one of {sorted(DTYPES)}, got {name!r}")
    if device == "cpu" and name == "float16":
        raise QbreakError(f"config key runtime.dtype: {name} is for GPUs (slower on CPU); use float32 on cpu")
    if device == "cpu" and name == "bfloat16" and not cpu_has_amx_bf16():
        raise QbreakError(
            "config key runtime.dtype: bfloat16 on cpu needs AMX bfloat16 units (Intel Xeon, 4th generation or "
            "later), which this CPU lacks (without them bfloat16 is slower than float32); use float32 on cpu"
        )
    import torch

    return getattr(torch, name)


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices with AMX tiles (torch's own probe, which also
    asks Linux for the tile state; /proc/cpuinfo's amx_bf16 flag where torch lacks the probe)."""
    import torch

    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if probe is not None:
        return bool(probe())
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune or trim
        return None
    return libc if all(hasattr(libc, name) for name in ("malloc_trim", "mallopt")) else None


# glibc mallopt parameters (malloc.h) and the values model jobs use
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD_BYTES = 16 << 20
TRIM_THRESHOLD_BYTES = 32 << 20


def tune_allocator() -> None:
    """Serve activation-sized buffers (< 16 MB) from the heap, not from fresh mmaps, and from one
    heap for all threads; glibc only.

    glibc's default maps every allocation above its (dynamic, history-dependent) mmap threshold
    fresh and unmaps it on free, so each [tokens, d_ff] activation of every layer faults its
    pages in again: 280-287k page faults per 16-example NLL pass of the bundled model, against
    17-20k with these fixed thresholds; 1.04-1.09x the NLL pass, 1.04x a compare job (one thread,
    fresh alternating processes, 2026-12-03; bench/RESULTS.md).
    The per-batch `release_freed_memory` still returns the freed heap, so memory stays flat.

    One arena: glibc gives each thread that allocates its own heap (arena), and a pass run as two
    streams (passes.py) allocates in three threads, each with its own free-but-touched pages
    between trims. With one arena the compare job's peak RSS per batch on two streams spread
    1,760-1,881 MB instead of 1,755-2,070 MB, at the same speed (57.5 vs 57.6 s and 61.4 vs 63.4 s
    for 64 examples, 2026-12-03; bench/RESULTS.md). Call before the job's threads start.
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        libc.mallopt(_M_ARENA_MAX, 1)


def release_freed_memory() -> None:
    """Return the heap's free pages to the OS (glibc malloc_trim); a no-op elsewhere.

    Called once per batch by the model passes. Without it glibc's dynamic mmap threshold moves
    the multi-MB activation buffers onto the heap, where small long-lived allocations (the
    per-example results) pin the freed space: a residual-statistics pass grew ~100 MB per batch
    (bench/memory_scaling.py: peak RSS 2.3x from 16 to 128 examples). Trimming keeps it flat.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


# glibc's FE_TONEAREST (0 on x86-64 and aarch64): the IEEE default rounding mode
_FE_TONEAREST = 0


def float_environment_faults() -> list[str]:
    """How the calling thread's floating-point environment departs from IEEE's default (round to
    nearest, subnormals kept); empty when it does not.

    The environment (x86: the MXCSR register) belongs to each OS thread, and a new thread starts
    with its creator's. A forward run under another rounding mode gives other numbers, not wrong
    looking ones: upward or downward rounding in one batch's forward moves the bundled model's NLLs
    by up to 1.6e-4 (toward zero 2.4e-5), where the kernel choices that legitimately differ between
    layouts move them by at most 2e-6 (bench/RESULTS.md, 2026-12-05). Probed with float32 arithmetic
    in this thread, so it sees what torch's CPU kernels in this thread see.
    """
    import numpy as np

    ulp = np.float32(2.0**-23)  # spacing of float32 numbers at 1
    # 1 + 0.75 ulp and -1 - 0.75 ulp: which neighbour each lands on tells the rounding mode
    ones = np.array([1.0, -1.0], dtype=np.float32) + np.array([0.75, -0.75], dtype=np.float32) * ulp
    away = (bool(ones[0] > 1), bool(ones[1] < -1))
    mode = {(True, True): None, (False, False): "toward zero", (False, True): "downward", (True, False): "upward"}
    faults = [] if mode[away] is None else [f"rounds {mode[away]}"]
    tiny = np.array([np.finfo(np.float32).tiny], dtype=np.float32)  # the smallest normal float32
    if (tiny * np.float32(0.5))[0] == 0:
        faults.append("flushes subnormal results to zero")
    subnormal = np.array([1], dtype=np.uint32).view(np.float32)
    if (subnormal + subnormal)[0] == 0:
        faults.append("reads subnormal inputs as zero")
    return faults


def ensure_default_float_environment(where: str) -> None:
    """Reset the calling thread to IEEE's default floating-point environment if anything changed
    it, with a warning naming `where` and what was found (see `float_environment_faults`).

    Model passes call it before every forward, so that a batch's numbers never depend on what
    else ran in the thread (or in the thread that created it) before."""
    faults = float_environment_faults()
    if not faults:
        return
    log.warning(
        "%s: thread %s %s; reset to IEEE defaults (round to nearest, subnormals kept) before the forward",
        where, threading.current_thread().name, " and ".join(faults),
    )
    _reset_float_environment()
    left = float_environment_faults()
    if left:
        raise RuntimeError(f"{where}: could not reset the floating-point environment; it still {' and '.join(left)}")


def _reset_float_environment() -> None:
    try:
        libm = ctypes.CDLL("libm.so.6")
    except OSError:
        libm = None
    if libm is not None and hasattr(libm, "fesetround"):
        libm.fesetround(_FE_TONEAREST)
    try:
        import torch
    except ImportError:
        return
    torch.set_flush_denormal(False)  # clears flush-to-zero and denormals-are-zero in this thread
