"""The SFT loss: summed token cross-entropy, normalised by the loss-bearing tokens of the whole optimizer step.

Why the sum: a step is split into however many micro-batches its samples need. If each micro-batch took its own
mean, short micro-batches would weigh as much as long ones and the gradient would depend on the split. Summing
token losses per micro-batch and dividing every micro-batch by the same step total makes the accumulated
gradient exactly the gradient of ``mean(token losses of the step)``, whatever the split.

Only the positions that carry a target are projected onto the vocabulary (transformers' ``logits_to_keep``
with a boolean mask), so prompt tokens never materialise full-vocabulary logits. With a large vocabulary the
output projection and the cross-entropy run in chunks (:func:`chunked_output_loss`), or, with ``use_liger=True``
on CUDA, in Liger's fused linear cross-entropy kernel (:func:`fused_head_loss`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import logging
import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from training_hub.engine.attention import attention_kwargs

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _accepts_logits_to_keep(model_cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_cls.forward).parameters


def packed_logits(model: torch.nn.Module, row: dict, keep: torch.Tensor) -> torch.Tensor:
    """Logits of one packed row (see ``batching.pack``) at the positions ``keep``: a bool (1, T) mask, or the 1-D
    positions themselves (``row["loss_index"]``).

    Each sample attends only to itself: with ``attention.packed_varlen`` or ``attention.packed_sdpa`` (see
    ``attention.use_packed_attention``) through the row's sample offsets; otherwise because ``position_ids``
    restart per sample and no attention mask is passed, from which transformers builds a block-diagonal causal
    mask. ``use_cache=False`` is required for that detection (with a cache, transformers skips it and samples
    would see each other).
    Returns a (num_kept, vocab) tensor.
    """
    inner = model.module if isinstance(model, DistributedDataParallel) else model  # call DDP, read the model
    kwargs = dict(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False)
    kwargs.update(attention_kwargs(getattr(inner.config, "_attn_implementation", None), row))
    if _accepts_logits_to_keep(type(inner)):
        logits = model(**kwargs, logits_to_keep=keep).logits
        return logits.reshape(-1, logits.shape[-1])
    logits = model(**kwargs).logits  # a model without logits_to_keep: project every position, then select
    return logits[0, keep] if keep.dim() == 1 else logits[keep]


# Full-vocabulary logits of the loss positions are projected in chunks when they would take more than this many
# elements at once (2**26 fp32 = 256 MiB; the bf16 copy and the gradient come on top). At 16k loss tokens and a
# 128k vocabulary the unchunked logits take 20-25 GB; chunked, one chunk of 512 positions at a time.
CHUNK_ELEMENTS = int(os.environ.get("TRAINING_HUB_LOSS_CHUNK_ELEMENTS", 2**26))  # the variable: for tests


# (hidden states at the loss positions, head weight, head bias, targets) -> summed cross-entropy
HeadLoss = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Tensor], torch.Tensor]


def token_loss_sum(model: torch.nn.Module, row: dict, head_loss: HeadLoss | None = None) -> torch.Tensor:
    """Sum of next-token cross-entropy over the loss-bearing targets of one packed row.

    With a large vocabulary the output projection and the cross-entropy run in chunks of positions, each
    recomputed in the backward pass (activation checkpointing), so the full logits never exist at once: the same
    sum, in a bounded amount of memory (:func:`chunked_output_loss`). ``head_loss`` (see :func:`fused_head_loss`)
    replaces the projection and the cross-entropy at every size when the output head is a plain linear layer.
    """
    keep = row.get("loss_index", row["loss_mask"])  # positions (no device sync to find them), or the mask
    targets = row["targets"][0, keep] if keep.dim() == 1 else row["targets"][keep]
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or (
            head_loss is None and targets.numel() * head.out_features <= CHUNK_ELEMENTS):
        return F.cross_entropy(packed_logits(model, row, keep).float(), targets, reduction="sum")
    with _head_returns_hidden_states(head):
        hidden = packed_logits(model, row, keep)  # the model's forward (DDP/FSDP2 hooks included), minus the head
    if head_loss is not None:
        return head_loss(hidden, head.weight, head.bias, targets)
    return chunked_output_loss(hidden, head.weight, head.bias, targets,
                               chunk=max(1, CHUNK_ELEMENTS // head.out_features))


def fused_head_loss(use_liger: bool, device: torch.device) -> HeadLoss | None:
    """Liger's fused linear cross-entropy (``use_liger=True``, on CUDA, with ``liger-kernel`` installed): the
    projection and the cross-entropy in one Triton kernel that works through the positions in chunks and computes
    the gradients in its forward, so neither the logits nor their gradient are ever held whole.

    None otherwise: our own chunked exact loss (:func:`chunked_output_loss`), which bounds memory the same way with
    plain PyTorch ops; the reason is logged when ``use_liger`` was asked for. (The backend warns about the ignored
    parameter before the run: ``config.upstream.handled``.)
    """
    if not use_liger:
        return None
    if device.type != "cuda" or importlib.util.find_spec("liger_kernel") is None:
        logger.info("use_liger=True: %s; the output loss is the engine's chunked exact cross-entropy",
                    "Liger's kernels run on CUDA only" if device.type != "cuda" else "liger-kernel is not installed")
        return None
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    extra = ({"accum_dtype": torch.float32}  # fp32 gradient accumulation over the chunks, as our master weights
             if "accum_dtype" in inspect.signature(liger_fused_linear_cross_entropy).parameters else {})

    def liger_loss(hidden, weight, bias, targets):
        # Its kernel wants one dtype: the weight (fp32 master, or bf16 under FSDP2's policy) in the hidden states'.
        # The cast is differentiable, so the gradient still reaches the fp32 weight.
        weight = weight.to(hidden.dtype)
        bias = None if bias is None else bias.to(hidden.dtype)
        return liger_fused_linear_cross_entropy(hidden, weight, targets, bias, reduction="sum", **extra).float()

    logger.info("use_liger=True: the output loss is Liger's fused linear cross-entropy")
    return liger_loss


@contextlib.contextmanager
def _head_returns_hidden_states(head: torch.nn.Linear):
    head.forward = lambda hidden: hidden  # an instance attribute: nn.Module.__call__ finds it first
    try:
        yield
    finally:
        del head.forward


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")


def chunked_output_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                        chunk: int) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, targets, reduction="sum")`` computed ``chunk`` positions at a time;
    each chunk's logits are freed after its forward and recomputed for its backward (under the same autocast)."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, t in zip(hidden.split(chunk), targets.split(chunk)):
        total = total + checkpoint(_chunk_loss, h, weight, bias, t, use_reentrant=False)
    return total


def step_loss_and_backward(model: torch.nn.Module, rows: list[dict], autocast, *, total_targets: int | None = None,
                           grad_scale: float = 1.0, accumulate=contextlib.nullcontext,
                           head_loss: HeadLoss | None = None, on_host: bool = True
                           ) -> tuple[float | torch.Tensor, int]:
    """Forward and backward every micro-batch of one optimizer step; return (mean token loss, loss tokens).

    Each micro-batch's summed loss is divided by the loss-bearing tokens of the *whole step* before its backward,
    so the accumulated gradients equal those of the step's mean token loss, however the step was split.

    Across ranks (see ``engine.distributed``): ``total_targets`` is the step's loss tokens summed over all ranks
    (default: those of ``rows``), ``grad_scale`` the number of ranks (DDP and FSDP2 average gradients over the
    ranks, so each rank's backward is scaled back up), and ``accumulate()`` wraps every backward but the last
    (DDP's ``no_sync``). The returned loss is then this rank's part of the step's mean; summed over ranks it is
    the mean. ``head_loss``: see :func:`token_loss_sum`. ``on_host=False`` returns the loss as a 0-d fp32 tensor
    on the device, so the caller can read it together with the gradient norm in the step's one host sync.
    """
    if total_targets is None:
        total_targets = sum(num_targets(row) for row in rows)
    denominator = max(total_targets, 1)
    loss_total = None
    for i, row in enumerate(rows):
        with autocast():
            loss_sum = token_loss_sum(model, row, head_loss)
        scaled = loss_sum if grad_scale == 1 else loss_sum * grad_scale
        with accumulate() if i < len(rows) - 1 else contextlib.nullcontext():
            (scaled / denominator).backward()
        loss_sum = loss_sum.detach()
        loss_total = loss_sum if loss_total is None else loss_total + loss_sum
    loss = loss_total.float() / denominator
    return (loss.item() if on_host else loss), total_targets


def num_targets(row: dict) -> int:
    """Loss-bearing targets of a packed row, counted on the host by ``pack`` (no device sync)."""
    return row["num_targets"] if "num_targets" in row else int(row["loss_mask"].sum())
