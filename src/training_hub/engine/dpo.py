"""The native DPO loop: setup -> reference pass -> train -> save -> clean up, in one file that reads top to bottom.

``train_dpo(config)`` is what the ``native`` dpo backend runs (a ``DPOConfig``). It reuses the SFT loop's parts:
model loading, device and autocast, token-budget step planning, packing, checkpoints, metrics and resume.

* Data: preference pairs tokenized by the same rules as the trl backend (``training_hub.data.preference``): chat
  template for message pairs, loss mask on the completion tokens only, the same ``max_length`` /
  ``max_prompt_length`` / ``truncate_long_samples`` policy.
* Batching: ``effective_batch_size`` pairs per optimizer step, split into micro-batches of at most
  ``max_tokens_per_gpu`` tokens (default: ``2 * max_length``). A pair's two sequences (prompt+chosen and
  prompt+rejected) always share a micro-batch and are packed like SFT samples, without padding: one row, position
  ids restarting per sequence, attention kept inside each sequence.
* Reference: the starting model's summed completion log-probs of every pair are computed once, before training,
  with the same packing; no second model stays in memory. A resumed run recomputes them from ``model_path``.
* Loss: the sigmoid DPO loss (``training_hub.losses.dpo``), the mean over the step's pairs however the step is
  split: each micro-batch's mean is weighted by its share of the step's pairs before its backward.
* metrics.jsonl: per step loss, lr, grad_norm and the step's implicit-reward statistics, computed in the forward
  pass before the update (as TRL logs them): ``reward_margin`` (mean chosen - rejected reward),
  ``reward_accuracy`` (share of pairs with chosen reward > rejected reward), ``reward_chosen``,
  ``reward_rejected``, ``logps_chosen``, ``logps_rejected`` (mean summed completion log-probs under the policy).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from training_hub.data.sources import fingerprint
from training_hub.engine import checkpoint as ckpt
from training_hub.engine import distributed, plan, storage
from training_hub.engine.batching import IGNORE_INDEX, Step, config_epoch, pack, pack_into_micro_batches
from training_hub.engine.compile import compile_model
from training_hub.engine.loss import num_targets, packed_logits
from training_hub.engine.model import device_and_autocast, load_model
from training_hub.engine.run import (
    Progress, Run, StepOutcome, execute, optimizer_and_scheduler, resume, run_plan, seed_everything, total_steps,
)
from training_hub.losses.dpo import dpo_sigmoid_loss
from training_hub.result import TrainingResult

logger = logging.getLogger(__name__)


@dataclass
class Pairs:
    """Tokenized preference pairs (dicts of prompt_ids, chosen_ids, rejected_ids) and the micro-batch budget."""

    train: list[dict]
    validation: list[dict] | None
    max_tokens: int
    dropped: int


# ---------------------------------------------------------------------------------------------------- setup

def pair_tokens(pair: dict) -> int:
    """Tokens a pair takes in a packed micro-batch: prompt+chosen and prompt+rejected."""
    return 2 * len(pair["prompt_ids"]) + len(pair["chosen_ids"]) + len(pair["rejected_ids"])


def prepare_pairs(config, tokenizer) -> Pairs:
    """Validate every pair (training and validation) before anything is written, then tokenize and split."""
    from datasets import Dataset

    from training_hub.data import load_preference_data
    from training_hub.data.preference import preference_length_policy, tokenize_pair

    raw = load_preference_data(config.data_path)
    raw_validation = load_preference_data(config.validation_data_path) if config.validation_data_path else None

    def tokenize(pairs, what):
        dataset = Dataset.from_list([tokenize_pair(tokenizer, pair) for pair in pairs])
        return preference_length_policy(dataset, config, what)

    train, dropped = tokenize(raw, "dpo (native)")
    validation = tokenize(raw_validation, "dpo (native) validation")[0] if raw_validation else None
    if config.validation_split > 0:
        split = train.train_test_split(test_size=config.validation_split, seed=config.seed, shuffle=True)
        train, validation = split["train"], split["test"]
    max_tokens = config.max_tokens_per_gpu or 2 * config.effective_max_length
    pairs = Pairs(train.to_list(), validation.to_list() if validation is not None else None, max_tokens, dropped)
    for what, items in (("training", pairs.train), ("validation", pairs.validation or [])):
        too_long = [pair_tokens(p) for p in items if pair_tokens(p) > max_tokens]
        if too_long:
            raise ValueError(
                f"{len(too_long)} {what} pair(s) need more than max_tokens_per_gpu={max_tokens} tokens (longest: "
                f"{max(too_long)}); a pair's prompt+chosen and prompt+rejected share one micro-batch. Raise "
                f"max_tokens_per_gpu to at least {max(too_long)}, or lower max_length.")
    return pairs


def collate_pairs(pairs: list[dict], indices: list[int], device) -> dict:
    """Pack pairs into one row as sequences chosen_0, rejected_0, chosen_1, ...; loss on completion tokens only."""
    ids, labels = [], []
    for i in indices:
        prompt = pairs[i]["prompt_ids"]
        for completion in (pairs[i]["chosen_ids"], pairs[i]["rejected_ids"]):
            ids.append(prompt + completion)
            labels.append([IGNORE_INDEX] * len(prompt) + completion)
    return pack(ids, labels, device=device)


def packed_sequence_logps(model, row: dict) -> torch.Tensor:
    """Summed log-probabilities of the loss-bearing tokens of each sequence of a packed row: (num_sequences,)."""
    mask = row["loss_mask"]
    logits = packed_logits(model, row, mask)
    token_logps = -F.cross_entropy(logits.float(), row["targets"][mask], reduction="none")
    bounds = row["cu_seqlens"]  # already on the device (batching.pack)
    sequence = torch.repeat_interleave(torch.arange(len(bounds) - 1, device=mask.device), bounds.diff(),
                                       output_size=mask.shape[1])
    return torch.zeros(len(bounds) - 1, device=mask.device).index_add(0, sequence[mask[0]], token_logps)


def micro_batches(pairs: list[dict], max_tokens: int) -> list[list[int]]:
    """All pairs, in budget-sized micro-batches (planned in chunks so large data sets plan quickly)."""
    lengths = [pair_tokens(p) for p in pairs]
    out = []
    for start in range(0, len(pairs), 512):
        out.extend(pack_into_micro_batches(list(range(start, min(start + 512, len(pairs)))), lengths, max_tokens))
    return out


@torch.no_grad()
def reference_logps(model, pairs: list[dict], max_tokens: int, device, autocast) -> torch.Tensor:
    """(num_pairs, 2) summed completion log-probs (chosen, rejected) under ``model`` as it is now, on the CPU."""
    model.eval()
    out = torch.zeros(len(pairs), 2)
    for micro in micro_batches(pairs, max_tokens):
        with autocast():
            out[micro] = packed_sequence_logps(model, collate_pairs(pairs, micro, device)).view(-1, 2).float().cpu()
    model.train()
    return out


def dpo_micro_batch(model, row: dict, reference: torch.Tensor, beta: float):
    """The sigmoid DPO loss (mean over the row's pairs) and per-pair statistics, shape (pairs, 2) each."""
    logps = packed_sequence_logps(model, row).view(-1, 2)
    reference = reference.to(logps.device)
    loss, chosen, rejected = dpo_sigmoid_loss(logps[:, 0], logps[:, 1], reference[:, 0], reference[:, 1], beta)
    return loss, logps.detach(), torch.stack([chosen, rejected], dim=1)


def summarize(loss_sum: torch.Tensor, logps: list[torch.Tensor], rewards: list[torch.Tensor]) -> dict:
    """Mean loss and reward statistics over the pairs of a step (or of the validation set), as 0-d tensors still
    on the device: the caller reads them in one host sync (``distributed.host_floats``)."""
    logps, rewards = torch.cat(logps), torch.cat(rewards)
    margins = rewards[:, 0] - rewards[:, 1]
    return {"loss": loss_sum / len(margins), "reward_margin": margins.mean(),
            "reward_accuracy": (margins > 0).float().mean(), "reward_chosen": rewards[:, 0].mean(),
            "reward_rejected": rewards[:, 1].mean(), "logps_chosen": logps[:, 0].mean(),
            "logps_rejected": logps[:, 1].mean()}


def step_loss_and_backward(model, micros: list[tuple[list[int], dict]], reference: torch.Tensor, beta: float,
                           autocast) -> dict:
    """Forward and backward every micro-batch of one step; the gradient is that of the mean loss over its pairs."""
    num_pairs = sum(len(indices) for indices, _ in micros)
    loss_sum, logps, rewards = 0.0, [], []
    for indices, row in micros:
        with autocast():
            loss, pair_logps, pair_rewards = dpo_micro_batch(model, row, reference[indices], beta)
        (loss * (len(indices) / num_pairs)).backward()
        loss_sum = loss_sum + loss.detach().float() * len(indices)
        logps.append(pair_logps.float())
        rewards.append(pair_rewards.float())
    return summarize(loss_sum, logps, rewards)


@torch.no_grad()
def validation_stats(model, pairs: list[dict], reference: torch.Tensor, beta: float, max_tokens: int, device,
                     autocast) -> dict:
    """DPO loss and reward statistics over the whole validation set."""
    model.eval()
    loss_sum, logps, rewards = 0.0, [], []
    for micro in micro_batches(pairs, max_tokens):
        with autocast():
            loss, pair_logps, pair_rewards = dpo_micro_batch(model, collate_pairs(pairs, micro, device),
                                                             reference[micro], beta)
        loss_sum = loss_sum + loss.float() * len(micro)
        logps.append(pair_logps.float())
        rewards.append(pair_rewards.float())
    model.train()
    stats = summarize(loss_sum, logps, rewards)
    return dict(zip(stats, distributed.host_floats(*stats.values())))


# ---------------------------------------------------------------------------------------------------- train

class DPORecipe:
    """DPO's own parts of a run (see ``engine.run``); built by :func:`train_dpo` once everything is set up."""

    def __init__(self, config: Any, *, device: torch.device, autocast, data: Pairs, tokenizer, model,
                 save_dtype: torch.dtype, optimizer, scheduler, root: Path):
        self.config, self.device, self.autocast, self.data, self.tokenizer = config, device, autocast, data, tokenizer
        self.model, self.save_dtype, self.optimizer, self.scheduler, self.root = (model, save_dtype, optimizer,
                                                                                   scheduler, root)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.lengths = [pair_tokens(p) for p in data.train]
        t0 = time.perf_counter()  # the reference log-probs: once, before any update
        self.reference = reference_logps(model, data.train, data.max_tokens, device, autocast)
        self.val_reference = (reference_logps(model, data.validation, data.max_tokens, device, autocast)
                              if data.validation else None)
        logger.info("reference log-probs of %d pairs in %.1fs", len(data.train) + len(data.validation or []),
                    time.perf_counter() - t0)

    def plan_epoch(self, epoch: int) -> list[Step]:
        return config_epoch(self.config, self.lengths, self.data.max_tokens, epoch)

    def train_step(self, step: Step, stop: Callable[[], bool]) -> StepOutcome:
        micros = [(micro, collate_pairs(self.data.train, micro, self.device)) for micro in step.micro_batches]
        stats = step_loss_and_backward(self.model, micros, self.reference, self.config.beta, self.autocast)
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.config.max_grad_norm or float("inf"))
        *values, grad_norm = distributed.host_floats(*stats.values(), norm)  # the step's one host sync
        stats = dict(zip(stats, values))
        lr = self.scheduler.get_last_lr()[0]
        loss = stats.pop("loss")
        loss_tokens = sum(num_targets(row) for _, row in micros)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # the run stops here (engine.run): apply nothing
            self.optimizer.zero_grad(set_to_none=True)
            return StepOutcome(loss=loss, lr=lr, grad_norm=grad_norm, loss_tokens=loss_tokens, extra=stats)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(loss=loss, lr=lr, grad_norm=grad_norm, loss_tokens=loss_tokens, stop=stop(), extra=stats)

    def validate(self) -> dict:
        return validation_stats(self.model, self.data.validation, self.val_reference, self.config.beta,
                                self.data.max_tokens, self.device, self.autocast)

    def save_checkpoint(self, samples_seen: int) -> Path | None:
        return ckpt.save_hf_checkpoint(self.model, self.tokenizer, self.root, samples_seen, self.save_dtype)

    def save_state(self, progress: dict) -> None:
        ckpt.save_training_state(self.root, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                 progress=progress)

    def load_state(self, path: Path) -> dict:
        return ckpt.load_training_state(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                        device=self.device)

    def result_metrics(self, progress: Progress) -> dict:
        last, last_validation = progress.last, progress.last_validation
        return {"final_loss": last.get("loss"), "final_reward_margin": last.get("reward_margin"),
                "final_reward_accuracy": last.get("reward_accuracy"),
                "validation_loss": last_validation.get("loss"),
                "validation_reward_accuracy": last_validation.get("reward_accuracy"),
                "dropped_or_truncated_samples": self.data.dropped}


def train_dpo(config: Any) -> TrainingResult:
    """Train ``config.model_path`` on the preference pairs in ``config.data_path``; return a ``TrainingResult``."""
    from transformers import AutoTokenizer

    root = Path(config.ckpt_output_dir)
    resume_from = storage.open_output_dir(config, root)
    device, autocast, _ = device_and_autocast(config)
    seed_everything(config.seed)

    tokenizer = AutoTokenizer.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code)
    data = prepare_pairs(config, tokenizer)  # validates all data before anything is written
    print(f"dpo: {len(data.train)} training pairs, {len(data.validation or [])} validation pairs, "
          f"{data.dropped} dropped or truncated (max_length {config.effective_max_length})", file=sys.stderr)
    from training_hub.fsutil import claim_directory
    with claim_directory(root):  # creates root; one live run per output directory
        steps_per_epoch, total = total_steps(config, len(data.train))
        progress = Progress(plan=run_plan(config, fingerprint(config.data_path), max_tokens_per_gpu=data.max_tokens,
                                          num_train_samples=len(data.train)))

        plan.check_fits(config, None, lambda: plan.dpo_run_data(data, tokenizer), device)  # CUDA: before loading
        model, save_dtype = load_model(config, device)
        compile_model(model, config, device)  # torch_compile: regional, self-checked (engine.compile)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer, scheduler = optimizer_and_scheduler(config, trainable, total)
        recipe = DPORecipe(config, device=device, autocast=autocast, data=data, tokenizer=tokenizer, model=model,
                           save_dtype=save_dtype, optimizer=optimizer, scheduler=scheduler, root=root)
        if resume_from is not None:
            resume(recipe, progress, config, total, resume_from)
        run = Run(config, root=root, ranks=distributed.SINGLE, device=device, steps_per_epoch=steps_per_epoch,
                  total_steps=total, progress=progress, resumed=resume_from is not None, desc="dpo")
        return execute(run, recipe, has_validation=bool(data.validation))
