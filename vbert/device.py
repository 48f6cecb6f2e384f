"""Every difference between CPU and CUDA lives here: device pick, dtype, pinned host memory, streams, sync.

The rest of the code asks a DeviceContext; nobody else calls torch.cuda.is_available().
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class DeviceContext:
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def create(cls, device: str = "auto", dtype: str = "auto") -> "DeviceContext":
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available in this torch build")
        if dtype == "auto":
            dt = torch.float16 if dev.type == "cuda" else torch.float32
        else:
            if dtype not in _DTYPES:
                raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
            dt = _DTYPES[dtype]
        if dev.type == "cpu" and dt != torch.float32:
            raise ValueError(f"dtype {dt} is only supported on CUDA; use float32 on CPU")
        return cls(dev, dt)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def describe(self) -> str:
        if self.is_cuda:
            return f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        return f"cpu ({step_threads()} threads)"

    # -- host memory ------------------------------------------------------------------------
    def host_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy suitable as the source of an async upload (pinned under CUDA)."""
        t = t.contiguous()
        return t.pin_memory() if self.is_cuda and not t.is_pinned() else t

    def to_device(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return t.to(self.device, dtype=dtype, non_blocking=self.is_cuda)

    # -- streams ---------------------------------------------------------------------------
    def new_stream(self):
        """A side stream for copies under CUDA; None on CPU (work runs inline)."""
        return torch.cuda.Stream(self.device) if self.is_cuda else None

    def stream(self, stream):
        """Context that makes `stream` current; a no-op for None (CPU)."""
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def record_event(self, stream=None):
        """An event marking the work queued so far on `stream` (None on CPU: work ran inline)."""
        if not self.is_cuda:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait_event(self, event) -> None:
        """Make the current stream wait for `event` (a no-op for None)."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)


# -- CPU threads -----------------------------------------------------------------------------
# torch's CPU backend runs intra-op work on OpenMP, which keeps a worker pool per thread that ever ran a
# parallel region. Once the process holds more pool threads than cores, every pool stops spin-waiting
# between regions (libgomp's throttled spin) and a step of many small ops runs markedly slower: SmolLM2
# decode of 16 rows on 2 cores took 100 ms instead of 75 ms on a step thread while the main thread,
# idle, still held the pool it made while loading. So intra-op parallelism belongs to the threads that
# run steps; the thread that starts the process loads models on one thread and makes no pool.
_step_threads: int | None = None


def fast_bfloat16(device: torch.device | str) -> bool:
    """Whether `device` multiplies bfloat16 faster than float32: a CUDA GPU that supports it, or a CPU with
    AVX-512 BF16 or AMX (elsewhere bfloat16 is emulated on CPU, slower than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in probes)


def reserve_cpu_for_steps(num_threads: int | None = None) -> int:
    """Call in the main thread at start-up, before any compute: later step threads (enter_step_thread)
    use num_threads intra-op threads (default: torch's count now), and this thread one (no OpenMP pool).
    Returns the step threads' count. Idempotent; a later call may change the count."""
    global _step_threads
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    if _step_threads is None or num_threads is not None:
        _step_threads = num_threads or torch.get_num_threads()
    torch.set_num_threads(1)
    return _step_threads


def enter_step_thread() -> None:
    """Call first in a thread that runs model steps: it gets the intra-op threads reserved for steps, for
    torch and for numba's parallel kernels (the decoder's LoRA) alike (a no-op unless reserve_cpu_for_steps
    was called). Without the numba half, a replica with one step thread still ran its LoRA kernel on every
    core: two decoder replicas on 2 cores generated 15 tokens/s together instead of 69."""
    if _step_threads is not None:
        _set_numba_threads(_step_threads)    # first: launching numba's OpenMP layer resets the OpenMP count
        torch.set_num_threads(_step_threads)


def _set_numba_threads(num_threads: int) -> None:
    """numba's parallel-region threads for the calling thread (thread-local), at most its pool's size."""
    try:
        import numba
    except ImportError:           # numba is optional for the paths that do not use it
        return
    numba.set_num_threads(max(1, min(num_threads, numba.config.NUMBA_NUM_THREADS)))


def step_threads() -> int:
    """The intra-op threads a step thread uses (torch's count if nothing was reserved)."""
    return _step_threads or torch.get_num_threads()


# -- the host heap ---------------------------------------------------------------------------------
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3       # glibc's mallopt parameters (malloc.h)


def keep_host_heap(keep_mb: int) -> bool:
    """Let this process keep up to `keep_mb` MiB of freed host memory for its next allocations instead of handing
    it back to the kernel (glibc malloc; returns False, changing nothing, where the C library has no mallopt).

    By default glibc serves a block of more than a few MiB (an activation of a batch) with its own mmap and unmaps
    it when it is freed, and trims the heap's top as soon as 128 KiB are free there, so every forward pass takes its
    activations' pages from the kernel anew, one page fault per 4 KiB: the encoder at 32 x 128 tokens faulted
    37,000-52,000 times a pass on this project's CPU VM (150-200 MB) and ran 7-12 % slower for it
    (benchmarks/host_heap.py). With this, blocks under
    keep_mb / 2 MiB come from the heap, and up to keep_mb MiB free at its top stay mapped: the next pass reuses them
    without a fault. The process's resident memory may then stay up to keep_mb above what it uses. 0 changes
    nothing. Process-wide; call at start-up (vbert serve and each Ray Serve replica do, `host_heap_keep_mb`; the
    commands train, evaluate, distill and build-table, `--host-heap-keep-mb`)."""
    if keep_mb < 0:
        raise ValueError(f"keep_mb must be >= 0, got {keep_mb}")
    if keep_mb == 0:
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):               # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    limit = (1 << 31) - 1                            # mallopt takes an int
    # the mmap threshold first: fixing either one stops glibc's own raising of both, and a fixed trim threshold
    # beside the initial 128 KiB mmap threshold would map every block anew (slower than the defaults)
    if not mallopt(_M_MMAP_THRESHOLD, min(keep_mb << 19, limit)):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, min(keep_mb << 20, limit)))
