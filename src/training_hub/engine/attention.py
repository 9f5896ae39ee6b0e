"""Attention for packed rows: each sample attends only to itself, at the cost of its own length squared.

A packed micro-batch is one row of several samples. transformers can confine attention to each sample by
deriving a block-diagonal mask from restarting position ids, but SDPA then still computes the full
(row length)^2 score matrix and masks most of it away: with a 4096-token row of ~150-token samples, that is
~25x more attention work than needed, and a (row length)^2 mask in memory.

``packed_sdpa`` instead runs causal SDPA once per sample (``is_causal=True``, no mask tensor at all), given the
sample boundaries of the row. It is registered as a transformers attention implementation, so the model's own
attention modules call it. :func:`use_packed_attention` switches a model to it only after a numeric self-check
(a packed sample's logits equal its logits alone); models it does not fit keep SDPA with the position-id mask,
which is checked the same way.

On CPU, bf16 inputs (bf16 autocast) are attended in fp32 and the result cast back to bf16: PyTorch's CPU flash
attention backward is about 2x slower in bf16 than in fp32 (measured on AMX Xeon, torch 2.13: 87 vs 36 ms for
the backward of a 4,358-token row of 26 samples, 8 heads of 64), and fp32 is also the more exact of the two.
On CUDA the inputs stay in bf16 (its bf16 kernels are the fast ones).
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

NAME = "training_hub_packed_sdpa"
BOUNDS_KWARG = "sample_bounds"  # cumulative sample offsets of the row, a list of ints: [0, len0, len0+len1, ...]


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                sliding_window=None, **kwargs):
    """transformers attention function: (1, heads, T, dim) q/k/v -> (1, T, heads, dim), causal within each sample."""
    bounds = kwargs.get(BOUNDS_KWARG)
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


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_sdpa)


@contextlib.contextmanager
def _exact_matmuls():
    """TF32 off for the self-check (the engine turns it on for CUDA training): the check is about where attention
    looks, so it compares full-precision results."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def packing_error(model, packed_implementation: str, reference_implementation: str) -> float:
    """Largest |logit difference| between two samples packed in one row (with ``packed_implementation``) and
    the same samples run alone (with ``reference_implementation``), relative to the largest |logit| (at least 1):
    a leak across samples changes logits at their own scale, rounding does not."""
    vocab = model.get_input_embeddings().weight.shape[0]
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, vocab, (n,), generator=g).to(device) for n in (5, 7))
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None].to(device)
    extra = {BOUNDS_KWARG: [0, 5, 12]} if packed_implementation == NAME else {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _exact_matmuls():
            model.set_attn_implementation(reference_implementation)
            alone = torch.cat([model(input_ids=x[None], use_cache=False).logits[0] for x in (a, b)])
            model.set_attn_implementation(packed_implementation)
            packed = model(input_ids=torch.cat([a, b])[None], position_ids=positions, use_cache=False,
                           **extra).logits[0]
    finally:
        model.train(was_training)
    return float((packed.float() - alone.float()).abs().max() / alone.float().abs().max().clamp_min(1.0))


def use_packed_attention(model, tolerance: float = 1e-4) -> bool:
    """Switch ``model`` to per-sample attention if it computes exactly what the model's own attention computes
    for each sample alone; return whether it did.

    Otherwise the model keeps its attention implementation with transformers' position-id mask, after the same
    check; if that leaks across samples too, raise (packing would silently train on the wrong attention).
    """
    register()
    previous = model.config._attn_implementation
    try:
        error = packing_error(model, NAME, previous)
        if error <= tolerance:
            return True
        reason = f"logits differ by {error:.2e}"
    except Exception as exc:  # a model whose attention does not go through transformers' interface
        reason = f"{type(exc).__name__}: {exc}"
    logger.info("per-sample packed attention unavailable for %s (%s); using %s with a position-id mask",
                type(model).__name__, reason, previous)
    error = packing_error(model, previous, previous)
    if error > tolerance:
        raise RuntimeError(
            f"{type(model).__name__} leaks attention across packed samples with attn_implementation={previous!r} "
            f"(logits differ by {error:.2e}); the native engine cannot train this model with packing")
    return False
