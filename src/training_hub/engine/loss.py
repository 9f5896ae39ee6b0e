"""The SFT loss: summed token cross-entropy, normalised by the loss-bearing tokens of the whole optimizer step.

Why the sum: a step is split into however many micro-batches its samples need. If each micro-batch took its own
mean, short micro-batches would weigh as much as long ones and the gradient would depend on the split. Summing
token losses per micro-batch and dividing every micro-batch by the same step total makes the accumulated
gradient exactly the gradient of ``mean(token losses of the step)``, whatever the split.

Only the positions that carry a target are projected onto the vocabulary (transformers' ``logits_to_keep``
with a boolean mask), so prompt tokens never materialise full-vocabulary logits.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from training_hub.engine.attention import BOUNDS_KWARG
from training_hub.engine.attention import NAME as PACKED_ATTENTION


@functools.lru_cache(maxsize=None)
def _accepts_logits_to_keep(model_cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_cls.forward).parameters


def packed_logits(model: torch.nn.Module, row: dict, keep: torch.Tensor) -> torch.Tensor:
    """Logits of one packed row (see ``batching.pack``) at the positions where ``keep`` (bool, (1, T)) is True.

    Each sample attends only to itself: with ``attention.packed_sdpa`` (see ``attention.use_packed_attention``)
    through the sample bounds; otherwise because ``position_ids`` restart per sample and no attention mask is
    passed, from which transformers builds a block-diagonal causal mask. ``use_cache=False`` is required for
    that detection (with a cache, transformers skips it and samples would see each other).
    Returns a (num_kept, vocab) tensor.
    """
    inner = model.module if isinstance(model, DistributedDataParallel) else model  # call DDP, read the model
    kwargs = dict(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False)
    if getattr(inner.config, "_attn_implementation", None) == PACKED_ATTENTION:
        kwargs[BOUNDS_KWARG] = row["sample_bounds"]
    if _accepts_logits_to_keep(type(inner)):
        logits = model(**kwargs, logits_to_keep=keep).logits
        return logits.reshape(-1, logits.shape[-1])
    return model(**kwargs).logits[keep]  # a model without logits_to_keep: project every position, then select


def token_loss_sum(model: torch.nn.Module, row: dict) -> torch.Tensor:
    """Sum of next-token cross-entropy over the loss-bearing targets of one packed row."""
    mask = row["loss_mask"]
    logits = packed_logits(model, row, mask)
    return F.cross_entropy(logits.float(), row["targets"][mask], reduction="sum")


def step_loss_and_backward(model: torch.nn.Module, rows: list[dict], autocast, *, total_targets: int | None = None,
                           grad_scale: float = 1.0, accumulate=contextlib.nullcontext) -> tuple[float, int]:
    """Forward and backward every micro-batch of one optimizer step; return (mean token loss, loss tokens).

    Each micro-batch's summed loss is divided by the loss-bearing tokens of the *whole step* before its backward,
    so the accumulated gradients equal those of the step's mean token loss, however the step was split.

    Across ranks (see ``engine.distributed``): ``total_targets`` is the step's loss tokens summed over all ranks
    (default: those of ``rows``), ``grad_scale`` the number of ranks (DDP and FSDP2 average gradients over the
    ranks, so each rank's backward is scaled back up), and ``accumulate()`` wraps every backward but the last
    (DDP's ``no_sync``). The returned loss is then this rank's part of the step's mean; summed over ranks it is
    the mean.
    """
    if total_targets is None:
        total_targets = sum(int(row["loss_mask"].sum()) for row in rows)
    denominator = max(total_targets, 1)
    loss_total = 0.0
    for i, row in enumerate(rows):
        with autocast():
            loss_sum = token_loss_sum(model, row)
        scaled = loss_sum if grad_scale == 1 else loss_sum * grad_scale
        with accumulate() if i < len(rows) - 1 else contextlib.nullcontext():
            (scaled / denominator).backward()
        loss_total += loss_sum.item()
    return loss_total / denominator, total_targets
