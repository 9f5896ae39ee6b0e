"""Token-budget batching: plan optimizer steps into micro-batches, and pack a micro-batch into one row.

Semantics (the upstream Training Hub's): an optimizer step sees ``effective_batch_size`` samples; the step is
split into micro-batches of at most ``max_tokens_per_gpu`` tokens each, and gradients are accumulated over them.

A micro-batch is packed without padding: its samples are concatenated into a single row, position ids restart
at 0 for every sample (transformers derives a block-diagonal causal mask from that, so attention stays inside
each sample), and labels are shifted *per sample* before concatenation, so no target crosses a sample boundary.

The plan is a pure function of (sample lengths, batch settings, seed, epoch): a resumed run recomputes exactly
the same plan and skips the steps it has already done.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from training_hub.data.training import check_sample_lengths  # noqa: F401  (it was defined here)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Step:
    """One optimizer step: its micro-batches (lists of sample indices) and its totals."""

    micro_batches: list[list[int]]  # this rank's share of the step
    num_samples: int  # of the whole step, across ranks
    num_tokens: int
    max_micro_batches: int = 0  # the most micro-batches any rank has in this step (every rank runs that many)
    largest_micro_batch: int = 0  # tokens of the largest micro-batch of any rank in this step (the memory peak)


def pack_into_micro_batches(indices: Sequence[int], lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Split one step's samples into as few micro-batches of <= max_tokens tokens as first-fit-decreasing finds.

    Each micro-batch keeps its samples in the order they were drawn, so the plan stays easy to read.
    """
    order = sorted(range(len(indices)), key=lambda k: -lengths[indices[k]])
    bins: list[list[int]] = []
    room: list[int] = []
    for k in order:
        n = lengths[indices[k]]
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(k)
                room[b] -= n
                break
        else:
            bins.append([k])
            room.append(max_tokens - n)
    return [[indices[k] for k in sorted(b)] for b in bins]


def split_across_ranks(indices: Sequence[int], lengths: Sequence[int], num_ranks: int) -> list[list[int]]:
    """Deal one step's samples to ``num_ranks`` ranks with about equal tokens each (longest first, to the rank with
    the fewest tokens so far); each share keeps the draw order. A rank may get no sample (a step smaller than the
    number of ranks)."""
    shares: list[list[int]] = [[] for _ in range(num_ranks)]
    tokens = [0] * num_ranks
    for k in sorted(range(len(indices)), key=lambda k: -lengths[indices[k]]):
        rank = min(range(num_ranks), key=lambda r: tokens[r])
        shares[rank].append(k)
        tokens[rank] += lengths[indices[k]]
    return [[indices[k] for k in sorted(share)] for share in shares]


def plan_epoch(lengths: Sequence[int], *, effective_batch_size: int,
               max_tokens_per_gpu: int, seed: int, epoch: int, num_ranks: int = 1, rank: int = 0) -> list[Step]:
    """The optimizer steps of one epoch: a seeded shuffle, cut into steps, each cut into micro-batches.

    The last step of an epoch may hold fewer than ``effective_batch_size`` samples; it is kept, not dropped.
    With ``num_ranks`` > 1 the same global steps are planned (the data order does not depend on the number of
    processes); each step's samples are split across the ranks (``split_across_ranks``) and the returned
    micro-batches are ``rank``'s share, packed into its own token budget.
    """
    check_sample_lengths(lengths, max_tokens_per_gpu)
    order = list(range(len(lengths)))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    steps = []
    for start in range(0, len(order), effective_batch_size):
        chosen = order[start:start + effective_batch_size]
        shares = split_across_ranks(chosen, lengths, num_ranks) if num_ranks > 1 else [chosen]
        packed = [pack_into_micro_batches(share, lengths, max_tokens_per_gpu) for share in shares]
        steps.append(Step(
            micro_batches=packed[rank],
            num_samples=len(chosen),
            num_tokens=sum(lengths[i] for i in chosen),
            max_micro_batches=max(len(p) for p in packed),
            largest_micro_batch=max(sum(lengths[i] for i in micro) for p in packed for micro in p or [[]]),
        ))
    return steps


def config_epoch(config, lengths: Sequence[int], max_tokens: int, epoch: int, num_ranks: int = 1,
                 rank: int = 0) -> list[Step]:
    """:func:`plan_epoch` with a run's settings: what the loops train and what ``engine.plan`` counts."""
    return plan_epoch(lengths, effective_batch_size=config.effective_batch_size, max_tokens_per_gpu=max_tokens,
                      seed=config.seed, epoch=epoch, num_ranks=num_ranks, rank=rank)


def shift_labels(labels: Sequence[int]) -> list[int]:
    """HF-convention labels (aligned with input_ids) -> next-token targets: position t predicts token t+1."""
    return list(labels[1:]) + [IGNORE_INDEX]


def pack(samples_input_ids: Sequence[Sequence[int]], samples_labels: Sequence[Sequence[int]], device=None) -> dict:
    """Concatenate samples into one row: input_ids, position_ids restarting per sample, per-sample shifted targets.

    Returns tensors of shape (1, total_tokens): ``input_ids``, ``position_ids``, ``targets`` (already shifted,
    IGNORE_INDEX where no loss) and ``loss_mask`` (bool, targets != IGNORE_INDEX); ``loss_index``, the positions
    of the loss-bearing targets (1-D); and, computed here on the host so that the training step needs no device
    sync for them, ``num_targets`` (an int) and ``sample_bounds``, the list of sample offsets in the row
    ([0, len0, len0 + len1, ...]) for per-sample attention. For varlen attention, the same offsets as
    ``cu_seqlens`` (an int32 (num_samples + 1,) tensor on ``device``) and ``max_seqlen``, the longest sample (an
    int): built once per micro-batch, not per layer. On CUDA the tensors go through pinned memory,
    asynchronously.
    """
    import torch

    input_ids: list[int] = []
    position_ids: list[int] = []
    targets: list[int] = []
    bounds = [0]
    for ids, labels in zip(samples_input_ids, samples_labels):
        if len(ids) != len(labels):
            raise ValueError(f"a sample has {len(ids)} input_ids but {len(labels)} labels")
        input_ids.extend(ids)
        position_ids.extend(range(len(ids)))
        targets.extend(shift_labels(labels))
        bounds.append(len(input_ids))
    row = {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "position_ids": torch.tensor([position_ids], dtype=torch.long),
        "targets": torch.tensor([targets], dtype=torch.long),
    }
    row["loss_mask"] = row["targets"] != IGNORE_INDEX
    row["loss_index"] = row["loss_mask"][0].nonzero().flatten()
    row["cu_seqlens"] = torch.tensor(bounds, dtype=torch.int32)
    if device is not None:
        pin = torch.device(device).type == "cuda"
        row = {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in row.items()}
    row["num_targets"] = sum(1 for t in targets if t != IGNORE_INDEX)
    row["sample_bounds"] = bounds
    row["max_seqlen"] = max((end - start for start, end in zip(bounds[:-1], bounds[1:])), default=0)
    return row
