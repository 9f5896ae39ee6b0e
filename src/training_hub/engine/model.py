"""Plain components every loop of the engine uses: the device and precision, and loading the model.

Kept apart from the loops so that no loop imports another (the SFT, DPO and future loops each import these).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Callable

import torch

from training_hub.engine import precision
from training_hub.engine.attention import use_packed_attention

logger = logging.getLogger("training_hub.engine")


def stored_dtype(model_path: str, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype the checkpoint at ``model_path`` stores its weights in (float32 when its config does not say).

    Checkpoints are written back in this dtype, whatever precision training used."""
    from transformers import AutoConfig

    saved = getattr(AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code), "dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    return saved if isinstance(saved, torch.dtype) and saved.is_floating_point else torch.float32


def checkpointing(setting: bool | None, device: torch.device) -> bool:
    """Whether to recompute activations: as asked, or (None) on CUDA, where activations are what runs out of
    memory first at scale, and off on CPU."""
    return device.type == "cuda" if setting is None else setting


def compute_dtype(config: Any, device: torch.device) -> torch.dtype | None:
    """The run's autocast dtype (None: fp32): ``precision.autocast_dtype`` for its ``dtype`` setting, the device
    and the model's width (read from its config.json, no weights)."""
    from transformers import AutoConfig

    hidden = None
    if config.dtype == "auto" and device.type == "cpu":
        model_config = AutoConfig.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code)
        hidden = getattr(model_config.get_text_config(), "hidden_size", None)
    compute = precision.autocast_dtype(config.dtype, device, hidden)
    if compute == torch.bfloat16 and device.type == "cpu" and not precision.cpu_has_native_bf16():
        _warn_emulated_bf16()
    return compute


@functools.lru_cache(maxsize=1)
def _warn_emulated_bf16() -> None:
    """Once per process: ``dtype="bfloat16"`` asked for on a CPU that has no bf16 matmul instructions."""
    logger.warning("dtype='bfloat16' on a CPU without native bf16 (no AMX-BF16 or AVX512-BF16): torch emulates bf16 "
                   "matmuls here (a linear layer's forward and backward measured 8x slower than fp32 on an AVX2 "
                   "CPU). dtype='auto' picks fp32 on this CPU; set 'auto' or 'float32' unless you need bf16 numerics")


def device_and_autocast(config: Any) -> tuple[torch.device, Callable[[], Any], torch.dtype | None]:
    """CUDA when present, else CPU; bf16 autocast where :func:`compute_dtype` says so ('bfloat16', or 'auto' on CUDA
    and, for wide enough models, on CPUs with native bf16), else plain fp32; and that compute dtype (None: fp32).
    The master weights stay fp32."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":  # TF32 for what stays in fp32 (OSFT's projections, fp32 runs): 8x the fp32 rate
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        warn_if_cpu_is_busy()
    compute = compute_dtype(config, device)
    if compute is not None:
        return device, lambda: torch.autocast(device.type, dtype=compute), compute
    return device, contextlib.nullcontext, None


def warn_if_cpu_is_busy() -> None:
    """Warn when other processes already keep this machine's cores busy: torch's OpenMP threads wait by spinning,
    so a run that shares its cores slows down far more than in proportion (measured here: a tiny model's step at
    6 s instead of 0.11 s with the 2 cores' load at 8; one thread per process brought it back)."""
    import os

    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on this platform
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = torch.get_num_threads()
    if threads > 1 and load >= 2 * cores:
        logger.warning("this machine is busy (load average %.1f on %d cores) and torch uses %d threads; shared cores "
                       "can slow training many times over. Set OMP_NUM_THREADS=1 (or torch.set_num_threads) for "
                       "this run, or run when the machine is free", load, cores, threads)


def load_model(config: Any, device: torch.device) -> tuple[torch.nn.Module, torch.dtype]:
    """The model in fp32 (master weights; bf16 runs use autocast), and the dtype its checkpoint was stored in.

    Attention is per-sample over the packed row when the model supports it (checked numerically, see
    ``attention.use_packed_attention``): a varlen flash kernel on CUDA in bf16/fp16 runs, else per-sample SDPA;
    else SDPA with transformers' block-diagonal mask from position ids.
    """
    from transformers import AutoModelForCausalLM

    save_dtype = stored_dtype(config.model_path, config.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(config.model_path, dtype=torch.float32, attn_implementation="sdpa",
                                                 trust_remote_code=config.trust_remote_code).to(device)
    attention = use_packed_attention(model, compute_dtype=compute_dtype(config, device))
    logger.info("attention: %s (self-check error %.1e)", attention.description, attention.error)
    if checkpointing(config.gradient_checkpointing, device):
        enable_checkpointing(model)
    model.train()
    return model, save_dtype


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in the backward pass (non-reentrant): what a run and its plan both do."""
    if hasattr(model, "activation_checkpointing_enable"):  # renamed in later transformers 5 releases
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
