"""Where training runs: device detection, torchrun/DDP/FSDP set-up, mixed precision, matmul peak.

The training loop (`loop.py`) uses these; stages call `init_distributed()` themselves before
building their batch sources, because a source reads its own rank's slice of the data.

    rank, world = init_distributed()      # (0, 1) unless launched by torchrun
    device = pick_device()                # cuda:LOCAL_RANK > mps > cpu
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import shutil
import time

import torch
import torch.distributed as dist

from chatforge.errors import ChatforgeError


def pick_device(name: str = "auto") -> torch.device:
    """`auto`: cuda (this rank's GPU under torchrun) > mps > cpu; or the named device."""
    if name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ChatforgeError(f"--device {name} asked for, but no CUDA GPU is available; use --device cpu")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def init_distributed() -> tuple[int, int]:
    """(rank, world_size). Under torchrun (WORLD_SIZE > 1) start the process group once:
    nccl between GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (identity when not distributed)."""
    if not is_distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # oneDNN runs bf16 matmuls natively only with AVX512-BF16 / AMX; elsewhere it emulates them
        # and autocast is slower than fp32.
        with contextlib.suppress(Exception):
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 where the hardware has it (measured on CPU: ~2x the fp32 training speed with
    the `small` preset on an AVX512-BF16 EPYC; see benchmarks/bench_train.py), else fp32."""
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision == "bf16" and not bf16_supported(device) and device.type != "cpu":
        raise ChatforgeError(f"--precision bf16 is not supported on {device}; use fp32 or auto")
    return precision


COMPILE_MODES = ("auto", "on", "off")
# A run must be at least this many micro-batches for `auto` to compile: compiling the `small`
# preset took ~20 s here and then saved ~0.2-0.5 s per 8 x 256 micro-batch, so it repays itself
# after ~100 micro-batches; tests and tiny runs stay eager. A bigger model does not simply repay
# it sooner: LoRA on the 135M SmolLM2 (8 x 512 tokens, bf16, 2 threads; benchmarks/bench_sft.py)
# ran 1.18x faster compiled on a busy machine but 0.94x on a quiet one, after ~3 min of compiling.
COMPILE_MIN_MICRO_STEPS = 300


def resolve_compile(mode: str, device: torch.device, micro_steps: int) -> bool:
    """Whether to torch.compile for `mode` (one of COMPILE_MODES; `TrainConfig` validates it).
    `auto` compiles long runs where a backend is available: on CPU inductor needs a C++
    compiler, on CUDA triton. Measured on the 2-core AVX512-BF16 EPYC (benchmarks/bench_train.py):
    fp32 ~1.4x and bf16 ~1.3x the eager speed. MPS stays eager."""
    if mode != "auto":
        return mode == "on"
    if micro_steps < COMPILE_MIN_MICRO_STEPS or not hasattr(torch, "compile"):
        return False
    if device.type == "cpu":
        return any(shutil.which(c) for c in ("g++", "c++", "clang++"))
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return False


def autocast(device: torch.device, precision: str):
    """The autocast context for `precision` (a no-op for fp32)."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


_PEAK: dict[tuple[str, str], float] = {}  # (device type, dtype) -> FLOP/s, measured once a process


def matmul_peak(device: torch.device, precision: str = "fp32", n: int = 1024, seconds: float = 0.3) -> float:
    """This machine's dense matmul throughput in FLOP/s, measured once and cached: the
    denominator of MFU (a measured peak, not the datasheet one, so 100% is reachable in theory)."""
    key = (device.type, precision)
    if key not in _PEAK:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        for _ in range(2):  # warm-up: kernel selection, page faults
            a @ b
        sync()
        iters, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds or iters < 3:
            a @ b
            iters += 1
        sync()
        _PEAK[key] = 2 * n ** 3 * iters / (time.perf_counter() - start)
    return _PEAK[key]


try:
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):       # not glibc: nothing to hand back this way
    _malloc_trim = None


def give_back_memory() -> None:
    """Hand the C heap's free pages back to the system. Tensors of a few MB (a layer's weights,
    a KV cache's per-layer blocks) come from glibc's heap, and what is freed stays resident there
    until trimmed: after one 7,900-token prompt the server held 880 MB more than when idle, all of
    it free, and quantizing the demo model in place left 270 MB of freed bf16 weights resident."""
    if _malloc_trim is not None:
        _malloc_trim(0)

