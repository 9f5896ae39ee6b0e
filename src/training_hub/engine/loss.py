"""The SFT loss: summed token cross-entropy, normalised by the loss-bearing tokens of the whole optimizer step.

Why the sum: a step is split into however many micro-batches its samples need. If each micro-batch took its own
mean, short micro-batches would weigh as much as long ones and the gradient would depend on the split. Summing
token losses per micro-batch and dividing every micro-batch by the same step total makes the accumulated
gradient exactly the gradient of ``mean(token losses of the step)``, whatever the split.

Only the positions that carry a target are projected onto the vocabulary (transformers' ``logits_to_keep``
with a boolean mask), so prompt tokens never materialise full-vocabulary logits.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

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
    kwargs = dict(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False)
    if getattr(model.config, "_attn_implementation", None) == PACKED_ATTENTION:
        kwargs[BOUNDS_KWARG] = row["sample_bounds"]
    if _accepts_logits_to_keep(type(model)):
        logits = model(**kwargs, logits_to_keep=keep).logits
        return logits.reshape(-1, logits.shape[-1])
    return model(**kwargs).logits[keep]  # a model without logits_to_keep: project every position, then select


def token_loss_sum(model: torch.nn.Module, row: dict) -> torch.Tensor:
    """Sum of next-token cross-entropy over the loss-bearing targets of one packed row."""
    mask = row["loss_mask"]
    logits = packed_logits(model, row, mask)
    return F.cross_entropy(logits.float(), row["targets"][mask], reduction="sum")


def step_loss_and_backward(model: torch.nn.Module, rows: list[dict], autocast) -> tuple[float, int]:
    """Forward and backward every micro-batch of one optimizer step; return (mean token loss, loss tokens).

    Each micro-batch's summed loss is divided by the loss-bearing tokens of the *whole step* before its backward,
    so the accumulated gradients equal those of the step's mean token loss, however the step was split.
    """
    total_targets = sum(int(row["loss_mask"].sum()) for row in rows)
    denominator = max(total_targets, 1)
    loss_total = 0.0
    for row in rows:
        with autocast():
            loss_sum = token_loss_sum(model, row)
        (loss_sum / denominator).backward()
        loss_total += loss_sum.item()
    return loss_total / denominator, total_targets
