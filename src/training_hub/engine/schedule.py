"""Learning-rate schedules: linear warmup, then constant, linear decay or cosine decay (as a LambdaLR)."""

from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(step: int, *, name: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based: the step about to be taken).

    Warmup rises linearly to 1 over ``warmup_steps`` steps (step 0 already gets 1/warmup_steps, never 0);
    afterwards ``linear`` and ``cosine`` decay from 1 to ``min_lr_ratio`` at ``total_steps``.
    """
    if name not in SCHEDULES:
        raise ValueError(f"lr_scheduler: unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    if name == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, *, name: str, warmup_steps: int, total_steps: int,
                    scheduler_kwargs: dict | None = None, start_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following :func:`lr_factor`. ``scheduler_kwargs`` accepts ``min_lr_ratio`` (default 0).

    ``start_step``: the optimizer step the schedule starts at (a resumed run whose schedule changed); the param
    groups' ``initial_lr`` is then the peak learning rate."""
    kwargs = dict(scheduler_kwargs or {})
    min_lr_ratio = float(kwargs.pop("min_lr_ratio", 0.0))
    if kwargs:
        raise ValueError(f"lr_scheduler_kwargs: unknown option(s) {', '.join(sorted(kwargs))}; "
                         "the native engine knows only 'min_lr_ratio'")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"lr_scheduler_kwargs: min_lr_ratio must be within [0, 1], got {min_lr_ratio}")

    def factor(step: int) -> float:
        return lr_factor(step, name=name, warmup_steps=warmup_steps, total_steps=total_steps,
                         min_lr_ratio=min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start_step - 1)
