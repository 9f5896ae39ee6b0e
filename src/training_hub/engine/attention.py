"""Attention for packed rows: each sample attends only to itself, at the cost of its own length squared.

A packed micro-batch is one row of several samples. transformers can confine attention to each sample by
deriving a block-diagonal mask from restarting position ids, but SDPA then still computes the full
(row length)^2 score matrix and masks most of it away: with a 4096-token row of ~150-token samples, that is
~25x more attention work than needed, and a (row length)^2 mask in memory. Two registered transformers
attention implementations avoid that; the model's own attention modules call them:

* ``packed_varlen`` (CUDA, bf16/fp16 runs): one variable-length flash-attention call per layer for the whole
  row, given ``cu_seqlens`` (int32 sample offsets, on the device) and ``max_seqlen`` (a host int), which
  ``batching.pack`` builds once per micro-batch: no per-sample launches and no host sync (and a graph that
  ``torch.compile`` can trace: both kernels are custom ops with fake implementations). The kernel is
  flash-attn's ``flash_attn_varlen_func`` when the package imports, else torch's own
  ``torch.nn.attention.varlen.varlen_attn``. flash-attn goes first because it also implements attention dropout
  and logit softcapping (torch's hard-codes dropout 0 and has no softcap) and is the kernel upstream Training
  Hub trains with; a flash-attn build that does not work with this torch fails the self-check below and
  torch's kernel is tried next. Both take (tokens, heads, dim) tensors, attend grouped kv heads natively, and
  count a sliding window inclusively: transformers' ``sliding_window=W`` (a query sees itself and the W-1
  tokens before it; transformers' own flash integration passes W-1 too) is ``window_size=(W - 1, 0)``.
* ``packed_sdpa`` (CPU, and the fallback): causal SDPA once per sample (``is_causal=True``, no mask tensor),
  given the sample bounds as a host list.

:func:`use_packed_attention` chooses, and only after numeric self-checks: the varlen kernel against a per-sample
reference on random tensors (GQA, a sliding window, forward and gradients), then the model's logits for two
samples packed in one row against each alone (:func:`packing_error`), in the run's half precision with a
relative tolerance; per-sample SDPA the same way in fp32 (1e-4). Models neither fits keep their attention with
the position-id mask, checked the same way.

On CPU, bf16 inputs (bf16 autocast) are attended in fp32 and the result cast back to bf16: PyTorch's CPU flash
attention backward is about 2x slower in bf16 than in fp32 (measured on AMX Xeon, torch 2.13: 87 vs 36 ms for
the backward of a 4,358-token row of 26 samples, 8 heads of 64), and fp32 is also the more exact of the two.
On CUDA the inputs stay in bf16 (its bf16 kernels are the fast ones).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import logging
from typing import Callable

import torch
import torch.nn.functional as F

from training_hub.engine.precision import exact_fp32_matmuls

logger = logging.getLogger(__name__)

NAME = "training_hub_packed_sdpa"  # per-sample SDPA
VARLEN_PREFIX = "training_hub_varlen_"  # + the kernel: one registered implementation per varlen kernel
BOUNDS_KWARG = "sample_bounds"  # cumulative sample offsets of the row, a list of ints: [0, len0, len0+len1, ...]
# The same offsets as an int32 tensor on the row's device, and the longest sample (a host int): the varlen kernel's.
# Prefixed so that no model's forward takes them for an argument of its own (ModernBERT's has ``cu_seqlens``).
CU_SEQLENS_KWARG = "packed_cu_seqlens"
MAX_SEQLEN_KWARG = "packed_max_seqlen"

TOLERANCE = 1e-4  # fp32 self-check: packed and alone compute the same sums in a different order
# Half-precision self-check, relative to the largest |logit| (at least 1): bf16 keeps 8 bits of mantissa (2**-9
# relative rounding per value) and the packed and alone runs round differently through every layer; a kernel
# that lets one sample see the other changes that sample's logits at their own scale. Measured on random tiny
# Qwen2s (2 layers, GQA 4/2) under bf16 autocast, with a CPU stand-in kernel: exact per-sample attention 2e-3;
# one that ignores cu_seqlens 0.17-0.45; one that counts the sliding window one key too wide 0.10-0.11 (and 0.72
# in ``kernel_error``, which compares attention outputs and gradients directly). Deeper models accumulate more
# rounding, hence 5e-2 rather than 1e-2 (benchmarks/gpu_check.py reports the figure of a 16-layer ~1B model).
HALF_TOLERANCE = 5e-2
HALF_DTYPES = (torch.bfloat16, torch.float16)


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                sliding_window=None, **kwargs):
    """transformers attention function: (1, heads, T, dim) q/k/v -> (1, T, heads, dim), causal within each sample."""
    bounds = kwargs.get(BOUNDS_KWARG)
    if isinstance(bounds, torch.Tensor):  # torch_compile'd layers pass them as a CPU tensor (engine.compile)
        bounds = bounds.tolist()
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"packed_sdpa does not implement {name}")
    if attention_mask is not None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        raise NotImplementedError("packed_sdpa handles one packed row without cache or mask")
    if bounds is None:
        bounds = [0, query.shape[2]]
    dropout = dropout if module.training else 0.0
    gqa = query.shape[1] != key.shape[1]
    out_dtype = query.dtype
    # bf16 on CPU: bf16 inputs, or bf16 autocast (which would cast q/k/v to bf16 here; with Qwen2/Llama rotary
    # embeddings q and k arrive in fp32 and v in bf16). See the module docstring.
    upcast = query.device.type == "cpu" and (
        torch.bfloat16 in (query.dtype, key.dtype, value.dtype)
        or (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16))
    if upcast:
        out_dtype = torch.bfloat16  # what SDPA returns under bf16 autocast
        query, key, value = query.float(), key.float(), value.float()
    # split (not slicing in a loop): its backward is one concatenation, where slicing would zero-fill a
    # full-size gradient buffer for every sample in every layer
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    outputs = []
    with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():  # else autocast recasts
        for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2)):
            mask, causal = None, True
            if sliding_window is not None and q.shape[2] > sliding_window:
                i = torch.arange(q.shape[2], device=query.device)
                mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < sliding_window)
                causal = False
            outputs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                          dropout_p=dropout, scale=scaling, enable_gqa=gqa))
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return out.transpose(1, 2).to(out_dtype, memory_format=torch.contiguous_format), None


# ------------------------------------------------------------------------------------------------ varlen kernels

@dataclasses.dataclass(frozen=True)
class VarlenKernel:
    """A variable-length attention kernel. ``fn(q, k, v, cu_seqlens, max_seqlen, scale=, window=, dropout=,
    softcap=)``: q (T, Hq, D), k and v (T, Hkv, D), all of one half dtype; cu_seqlens int32 (N+1,); window
    (left, right) in flash-attention's inclusive convention, (-1, 0) plain causal -> (T, Hq, D).

    Each kernel is its own attention implementation (``name``), so that the name a model carries, which FSDP2's
    other ranks receive from rank 0, says which kernel it runs."""

    name: str  # VARLEN_PREFIX + ...
    label: str
    fn: Callable[..., torch.Tensor]
    dropout: bool = False  # implements attention dropout
    softcap: bool = False  # implements logit softcapping


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen, *, scale, window, dropout, softcap):
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale, window_size=window,
                       enable_gqa=q.shape[1] != k.shape[1])


def _flash_attn_varlen(q, k, v, cu_seqlens, max_seqlen, *, scale, window, dropout, softcap):
    from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]

    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=dropout,
                                  softmax_scale=scale, causal=True, window_size=window, softcap=softcap)


FLASH_ATTN = VarlenKernel(VARLEN_PREFIX + "flash_attn", "flash_attn.flash_attn_varlen_func", _flash_attn_varlen,
                          dropout=True, softcap=True)
TORCH_VARLEN = VarlenKernel(VARLEN_PREFIX + "torch", "torch.nn.attention.varlen.varlen_attn", _torch_varlen)


def varlen_kernels(device: torch.device) -> list[VarlenKernel]:
    """The varlen kernels to try on ``device``, best first: flash-attn's when the package is installed, then
    torch's (see the module docstring). None off CUDA: both are CUDA flash kernels."""
    if torch.device(device).type != "cuda":
        return []
    modules = {FLASH_ATTN: "flash_attn", TORCH_VARLEN: "torch.nn.attention.varlen"}
    return [kernel for kernel, module in modules.items() if importlib.util.find_spec(module) is not None]


def _half_dtype(*tensors: torch.Tensor) -> torch.dtype | None:
    """The half dtype the kernel runs in: autocast's, else the inputs' own (None: fp32, which flash cannot do)."""
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) in HALF_DTYPES:
        return torch.get_autocast_dtype(device)
    return next((t.dtype for t in tensors if t.dtype in HALF_DTYPES), None)


def _offsets_from_positions(position_ids, length: int, device) -> tuple[torch.Tensor, int]:
    """(cu_seqlens, max_seqlen) of a row whose samples restart their position ids at 0 (transformers' own packed
    convention); one sample without position ids. A fallback for calls without the packed kwargs: it syncs."""
    if position_ids is None:
        return torch.tensor([0, length], dtype=torch.int32, device=device), length
    starts = position_ids.reshape(-1) == 0
    starts[0] = True
    index = torch.arange(length + 1, device=device, dtype=torch.int32)
    offsets = torch.cat([index[:-1][starts], index[-1:]])
    return offsets, int(offsets.diff().max())


def packed_varlen(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                  sliding_window=None, softcap=None, *, kernel: VarlenKernel, **kwargs):
    """transformers attention function (registered with ``kernel`` bound, see :func:`register_kernel`):
    (1, heads, T, dim) q/k/v -> (1, T, heads, dim), causal within each sample, in one varlen kernel call."""
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("packed_varlen does not implement attention sinks (s_aux)")
    if softcap is not None and not kernel.softcap:
        raise NotImplementedError(f"{kernel.label} does not implement softcap")
    if attention_mask is not None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        raise NotImplementedError("packed_varlen handles one packed row without cache or mask")
    dropout = dropout if module.training else 0.0
    if dropout and not kernel.dropout:
        raise NotImplementedError(f"{kernel.label} does not implement attention dropout")
    half = _half_dtype(query, key, value)
    if half is None:
        raise NotImplementedError("varlen flash attention needs bf16 or fp16 inputs (or bf16/fp16 autocast)")
    offsets, longest = kwargs.get(CU_SEQLENS_KWARG), kwargs.get(MAX_SEQLEN_KWARG)
    if offsets is None:
        offsets, longest = _offsets_from_positions(kwargs.get("position_ids"), query.shape[2], query.device)
    window = (-1, 0) if sliding_window is None or longest <= sliding_window else (sliding_window - 1, 0)
    # (1, H, T, D) -> (T, H, D) in the half dtype (under autocast rotary q and k arrive in fp32), contiguous (free
    # for transformers' q/k/v, which are (1, T, H, D) views; ``to`` alone keeps a tensor already in that dtype)
    q, k, v = (x[0].transpose(0, 1).to(half).contiguous() for x in (query, key, value))
    out = kernel.fn(q, k, v, offsets, longest, scale=scaling, window=window, dropout=dropout, softcap=softcap or 0.0)
    return out.unsqueeze(0), None


def register_kernel(kernel: VarlenKernel) -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(kernel.name, functools.partial(packed_varlen, kernel=kernel))


def register() -> None:
    """Register the engine's attention implementations with transformers (importing no kernel)."""
    from transformers import AttentionInterface

    # opaque to torch.compile (engine.compile): traced, its per-sample loop would be unrolled per sample count
    AttentionInterface.register(NAME, torch.compiler.disable(packed_sdpa))
    for kernel in (FLASH_ATTN, TORCH_VARLEN):
        register_kernel(kernel)


def attention_kwargs(implementation: str | None, row: dict) -> dict:
    """What the model call passes for a packed row (see ``batching.pack``) to ``implementation``."""
    if implementation is not None and implementation.startswith(VARLEN_PREFIX):
        return {CU_SEQLENS_KWARG: row["cu_seqlens"], MAX_SEQLEN_KWARG: row["max_seqlen"]}
    if implementation == NAME:
        return {BOUNDS_KWARG: row["sample_bounds"]}
    return {}


# ------------------------------------------------------------------------------------------------ self-checks

def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value - reference| relative to max |reference| (at least 1)."""
    value, reference = value.detach().float(), reference.detach().float()
    return float((value - reference).abs().max() / reference.abs().max().clamp_min(1.0))


def packing_error(model, packed_implementation: str, reference_implementation: str,
                  dtype: torch.dtype | None = None) -> float:
    """Largest |logit difference| between two samples packed in one row (with ``packed_implementation``) and
    the same samples run alone (with ``reference_implementation``), relative to the largest |logit| (at least 1):
    a leak across samples changes logits at their own scale, rounding does not. ``dtype``: both under that
    autocast (the run's half precision; the varlen kernel has no fp32)."""
    vocab = model.get_input_embeddings().weight.shape[0]
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, vocab, (n,), generator=g).to(device) for n in (5, 7))
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None].to(device)
    row = {"sample_bounds": [0, 5, 12], "max_seqlen": 7,
           "cu_seqlens": torch.tensor([0, 5, 12], dtype=torch.int32, device=device)}
    precision = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), exact_fp32_matmuls(), precision:
            model.set_attn_implementation(reference_implementation)
            alone = torch.cat([model(input_ids=x[None], use_cache=False).logits[0] for x in (a, b)])
            model.set_attn_implementation(packed_implementation)
            packed = model(input_ids=torch.cat([a, b])[None], position_ids=positions, use_cache=False,
                           **attention_kwargs(packed_implementation, row)).logits[0]
    finally:
        model.train(was_training)
    return _relative(packed, alone)


def kernel_error(kernel: VarlenKernel, device, dtype: torch.dtype) -> float:
    """``kernel`` against exact per-sample attention (:func:`packed_sdpa` in fp32 on the same half-precision
    inputs) on random tensors: three samples in one row, 4 query heads on 2 kv heads, without and with a sliding
    window of 4 tokens; the largest relative error of the output and of the q, k and v gradients."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    bounds = [0, 5, 24, 32]
    offsets = torch.tensor(bounds, dtype=torch.int32, device=device)
    q, k, v = (torch.randn(32, heads, 64, generator=g).to(device, dtype) for heads in (4, 2, 2))
    grad = torch.randn(32, 4, 64, generator=g).to(device, dtype)
    errors = []
    with exact_fp32_matmuls():
        for window in (None, 4):
            inputs = [x.clone().requires_grad_() for x in (q, k, v)]
            out = kernel.fn(*inputs, offsets, 19, scale=None, window=(-1, 0) if window is None else (window - 1, 0),
                            dropout=0.0, softcap=0.0)
            exact = [x.float().requires_grad_() for x in (q, k, v)]
            eq, ek, ev = (x.transpose(0, 1)[None] for x in exact)
            reference = packed_sdpa(SimpleNamespace(training=False), eq, ek, ev, None, sliding_window=window,
                                    sample_bounds=bounds)[0][0]
            errors.append(_relative(out, reference))
            grads = torch.autograd.grad(out, inputs, grad)
            exact_grads = torch.autograd.grad(reference, exact, grad.float())
            errors.extend(_relative(a, b) for a, b in zip(grads, exact_grads))
    return max(errors)


@dataclasses.dataclass(frozen=True)
class AttentionChoice:
    """What :func:`use_packed_attention` chose: the model's attention implementation now, in words, and its
    self-check errors (the model's logits; the varlen kernel's own check, when it was one); ``refused``: the
    faster paths it tried first, each with why not. True when packed rows are attended per sample (varlen or
    per-sample SDPA), False for the position-id mask."""

    implementation: str
    description: str
    error: float
    kernel_error: float | None = None
    refused: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.implementation == NAME or self.implementation.startswith(VARLEN_PREFIX)


def _check(model, implementation: str, reference: str, tolerance: float, dtype=None) -> tuple[float, str | None]:
    """(packing_error, None) when it is within ``tolerance``, else (error or nan, why not)."""
    try:
        error = packing_error(model, implementation, reference, dtype)
    except Exception as exc:  # a model whose attention does not go through transformers' interface, a kernel that fails
        return float("nan"), f"{type(exc).__name__}: {exc}"
    return error, None if error <= tolerance else f"logits differ by {error:.2e}"


def _try_varlen(model, kernel: VarlenKernel, reference: str, dtype: torch.dtype) -> AttentionChoice | str:
    """Switch ``model`` to ``kernel`` through :func:`packed_varlen` if it passes both self-checks in ``dtype``;
    else say why not."""
    error, reason = float("nan"), None
    if getattr(model.config.get_text_config(), "attention_dropout", 0.0) and not kernel.dropout:
        reason = "the model has attention dropout, which this kernel does not implement"
    else:
        try:
            error = kernel_error(kernel, next(model.parameters()).device, dtype)
            reason = None if error <= HALF_TOLERANCE else f"its outputs or gradients differ by {error:.2e}"
        except Exception as exc:  # not built for this GPU, a flash-attn build for another torch, ...
            reason = f"{type(exc).__name__}: {exc}"
    if reason is None:
        register_kernel(kernel)
        model_error, reason = _check(model, kernel.name, reference, HALF_TOLERANCE, dtype)
        if reason is None:
            return AttentionChoice(kernel.name, f"varlen ({kernel.label}, {dtype})", model_error, error)
    logger.info("varlen attention with %s unavailable for %s (%s)", kernel.label, type(model).__name__, reason)
    return f"{kernel.label}: {reason}"


def use_packed_attention(model, tolerance: float = TOLERANCE, compute_dtype: torch.dtype | None = None
                         ) -> AttentionChoice:
    """Switch ``model`` to per-sample attention if it computes what the model's own attention computes for each
    sample alone; return the choice (true when per-sample).

    ``compute_dtype``: the run's autocast dtype (None: fp32). On CUDA with bf16/fp16 the varlen kernels are tried
    first (checked in that dtype, ``HALF_TOLERANCE``), then per-sample SDPA (checked in fp32, ``tolerance``).
    Otherwise the model keeps its attention implementation with transformers' position-id mask, after the same
    check; if that leaks across samples too, raise (packing would silently train on the wrong attention).
    """
    register()
    previous = model.config._attn_implementation
    refused: list[str] = []
    if compute_dtype in HALF_DTYPES:
        for kernel in varlen_kernels(next(model.parameters()).device):
            choice = _try_varlen(model, kernel, previous, compute_dtype)
            if isinstance(choice, AttentionChoice):
                return dataclasses.replace(choice, refused=tuple(refused))
            refused.append(choice)
    error, reason = _check(model, NAME, previous, tolerance)
    if reason is None:
        return AttentionChoice(NAME, "per-sample SDPA", error, refused=tuple(refused))
    refused.append(f"per-sample SDPA: {reason}")
    logger.info("per-sample packed attention unavailable for %s (%s); using %s with a position-id mask",
                type(model).__name__, reason, previous)
    error = packing_error(model, previous, previous)
    if error > tolerance:
        raise RuntimeError(
            f"{type(model).__name__} leaks attention across packed samples with attn_implementation={previous!r} "
            f"(logits differ by {error:.2e}); the native engine cannot train this model with packing")
    return AttentionChoice(previous, f"{previous}, position-id mask", error, refused=tuple(refused))
