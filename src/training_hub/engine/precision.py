"""Which compute dtype a run uses: the one rule behind ``dtype="auto"``, for every backend.

``dtype`` is ``"auto"``, ``"bfloat16"`` or ``"float32"``. Training always keeps fp32 master weights; a bf16 run
means bf16 *autocast* (matmuls in bf16, reductions and the optimizer in fp32). ``"auto"`` picks bf16 wherever
the hardware does bf16 matmuls natively, because there it is several times faster than fp32:

* CUDA: bf16 (tensor cores).
* CPU with AMX-BF16 or AVX512-BF16 (Intel Sapphire Rapids and later, AMD Zen 4 and later): bf16. On a 2-core
  AMX machine a bf16 matmul peaks near 1.9 TFLOP/s against about 0.33 for fp32, and TRL's ``SFTConfig``
  already defaults to bf16 there, so fp32 would make ``auto`` several times slower than the obvious baseline.
* Any other CPU: fp32. Without native bf16 instructions oneDNN emulates bf16 by converting to fp32, which is
  slower than fp32 itself and less exact (measured on an AVX2 AMD EPYC, 2 threads: a linear layer's forward and
  backward 8x slower, a plain bf16 matmul 140x). Asking for "bfloat16" there is allowed, with a warning
  (``engine.model.compute_dtype``).

Loss curves of bf16 autocast track fp32 closely (``tests/test_engine_train.py``,
``test_gradient_checkpointing_is_exact_and_bf16_autocast_is_close``).

Import-cheap: only torch (and the standard library).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

__all__ = ["cpu_has_native_bf16", "autocast_dtype", "exact_fp32_matmuls", "DTYPES"]

DTYPES = ("auto", "bfloat16", "float32")
_BF16_CPU_FLAGS = {"amx_bf16", "avx512_bf16"}


def _cpuinfo_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags Linux reports (empty where there is no /proc/cpuinfo)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """True when this CPU executes bf16 matmuls natively (AMX-BF16 or AVX512-BF16). Cached.

    Asks torch first (``torch.cpu._is_amx_tile_supported`` / ``_is_avx512_bf16_supported``, the checks oneDNN's
    dispatch uses; ``torch.backends.cpu.get_cpu_capability()`` reports only up to "AVX512" and so cannot tell),
    then falls back to the Linux CPU flags.
    """
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    for check in checks:
        try:
            if check is not None and check():
                return True
        except Exception:  # a private torch helper that changed: fall back to the flags
            pass
    return bool(_cpuinfo_flags() & _BF16_CPU_FLAGS)


# On CPU, bf16 pays off only when the matmuls are big enough to outweigh the casts around them. Measured on this
# machine (AMX, 2 threads): hidden 512 (12.5M parameters) trains about 2x faster in bf16 than TRL's bf16 default
# and faster than fp32; the 190k-parameter demo model (hidden 64) trains 0.65x as fast in bf16 as in fp32.
CPU_BF16_MIN_HIDDEN = 512


def autocast_dtype(dtype: str, device: torch.device, hidden_size: int | None = None) -> torch.dtype | None:
    """The autocast dtype for a run's ``dtype`` setting on ``device``; None means plain fp32 (no autocast).

    "bfloat16" -> torch.bfloat16; "float32" -> None; "auto" -> torch.bfloat16 on CUDA, and on a CPU with native
    bf16 (see :func:`cpu_has_native_bf16`) for models at least ``CPU_BF16_MIN_HIDDEN`` wide (``hidden_size``;
    None: assume wide enough), else None.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(repr, DTYPES))}, got {dtype!r}")
    if dtype == "bfloat16":
        return torch.bfloat16
    if dtype == "float32":
        return None
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16
    wide = hidden_size is None or hidden_size >= CPU_BF16_MIN_HIDDEN
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() and wide else None


@contextlib.contextmanager
def exact_fp32_matmuls():
    """CUDA fp32 matmuls (and cuDNN convolutions) without TF32 inside the block; the settings are restored after it.

    The engine allows TF32 for CUDA training (``engine.model.device_and_autocast``); what must be exact opts out:
    the numeric self-checks (``engine.attention``) and OSFT's parameter projection (``engine.osft``).
    """
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
