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
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from training_hub.engine import checkpoint as ckpt
from training_hub.engine.batching import IGNORE_INDEX, pack, pack_into_micro_batches, plan_epoch
from training_hub.engine.loss import packed_logits
from training_hub.engine.metrics import MetricsWriter, peak_memory_bytes, progress_bar, step_record
from training_hub.engine.reporter import RunReporter
from training_hub.engine.schedule import build_scheduler
from training_hub.engine.trainer import (
    after_step, check_resume_matches, count_step, device_and_autocast, end_of_epoch, load_model, stop_on_sigterm,
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

def check_dpo_supported(config) -> None:
    """Refuse what the native DPO loop cannot do (before any work), and warn about settings it ignores."""
    if config.loss_type != "sigmoid":
        raise ValueError(f"loss_type={config.loss_type!r}: the native dpo backend implements only the sigmoid loss; "
                         "use backend='trl' for hinge or ipo.")
    wanted = config.nproc_per_node if isinstance(config.nproc_per_node, int) else 1
    if wanted > 1 or config.nnodes > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"nproc_per_node={config.nproc_per_node}, nnodes={config.nnodes}: the native dpo backend "
                         "trains in one process; use nproc_per_node=1 and nnodes=1, or backend='trl' under torchrun.")
    # W&B / TensorBoard / MLflow: engine.reporter; use_liger: training_hub.compat warns when it cannot take effect


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
    bounds = torch.tensor(row["sample_bounds"], device=mask.device)
    sequence = torch.repeat_interleave(torch.arange(len(bounds) - 1, device=mask.device), bounds.diff())
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


def summarize(loss_sum: float, logps: list[torch.Tensor], rewards: list[torch.Tensor]) -> dict:
    """Mean loss and reward statistics over the pairs of a step (or of the validation set)."""
    logps, rewards = torch.cat(logps), torch.cat(rewards)
    margins = rewards[:, 0] - rewards[:, 1]
    return {"loss": loss_sum / len(margins), "reward_margin": margins.mean().item(),
            "reward_accuracy": (margins > 0).float().mean().item(), "reward_chosen": rewards[:, 0].mean().item(),
            "reward_rejected": rewards[:, 1].mean().item(), "logps_chosen": logps[:, 0].mean().item(),
            "logps_rejected": logps[:, 1].mean().item()}


def step_loss_and_backward(model, micros: list[tuple[list[int], dict]], reference: torch.Tensor, beta: float,
                           autocast) -> dict:
    """Forward and backward every micro-batch of one step; the gradient is that of the mean loss over its pairs."""
    num_pairs = sum(len(indices) for indices, _ in micros)
    loss_sum, logps, rewards = 0.0, [], []
    for indices, row in micros:
        with autocast():
            loss, pair_logps, pair_rewards = dpo_micro_batch(model, row, reference[indices], beta)
        (loss * (len(indices) / num_pairs)).backward()
        loss_sum += loss.item() * len(indices)
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
        loss_sum += loss.item() * len(micro)
        logps.append(pair_logps.float())
        rewards.append(pair_rewards.float())
    model.train()
    return summarize(loss_sum, logps, rewards)


# ---------------------------------------------------------------------------------------------------- train

def train_dpo(config) -> TrainingResult:
    """Train ``config.model_path`` on the preference pairs in ``config.data_path``; return a ``TrainingResult``."""
    from transformers import AutoTokenizer

    check_dpo_supported(config)
    root = Path(config.ckpt_output_dir)
    resume_from = ckpt.check_output_dir(root, config.resume)
    device, autocast = device_and_autocast(config.dtype)
    random.seed(config.seed)
    torch.manual_seed(config.seed)

    tokenizer = AutoTokenizer.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code)
    data = prepare_pairs(config, tokenizer)  # validates all data before anything is written
    print(f"dpo: {len(data.train)} training pairs, {len(data.validation or [])} validation pairs, "
          f"{data.dropped} dropped or truncated (max_length {config.effective_max_length})", file=sys.stderr)
    root.mkdir(parents=True, exist_ok=True)
    lengths = [pair_tokens(p) for p in data.train]
    steps_per_epoch = math.ceil(len(lengths) / config.effective_batch_size)
    total_steps = steps_per_epoch * config.num_epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    plan_keys = {"seed": config.seed, "effective_batch_size": config.effective_batch_size,
                 "max_tokens_per_gpu": data.max_tokens, "num_train_samples": len(lengths),
                 "model_path": str(config.model_path), "beta": config.beta,
                 "max_length": config.effective_max_length, "max_prompt_length": config.max_prompt_length}

    model, save_dtype = load_model(config, device)
    t0 = time.perf_counter()
    reference = reference_logps(model, data.train, data.max_tokens, device, autocast)  # once, before any update
    val_reference = reference_logps(model, data.validation, data.max_tokens, device, autocast) \
        if data.validation else None
    logger.info("reference log-probs of %d pairs in %.1fs", len(data.train) + len(data.validation or []),
                time.perf_counter() - t0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, betas=(config.beta1, config.beta2),
                                  eps=config.eps, weight_decay=config.weight_decay, fused=True)
    scheduler = build_scheduler(optimizer, name=config.lr_scheduler, warmup_steps=config.warmup_steps,
                                total_steps=total_steps, scheduler_kwargs=config.lr_scheduler_kwargs)

    progress = {"global_step": 0, "epoch": 0, "step_in_epoch": 0, "samples_seen": 0, "tokens_seen": 0,
                "elapsed": 0.0, "last_saved_samples": None, "last": {}, **plan_keys}
    if resume_from is not None:
        saved = ckpt.load_training_state(resume_from, model=model, optimizer=optimizer, scheduler=scheduler,
                                         device=device)
        check_resume_matches(saved, plan_keys)
        progress.update({k: saved[k] for k in progress if k in saved and k not in plan_keys})
        logger.info("resuming from %s (step %d, %d pairs seen)", resume_from, saved["global_step"],
                    saved["samples_seen"])
    metrics = RunReporter(MetricsWriter(root / ckpt.METRICS_FILE,
                                        keep_through_step=progress["global_step"] if resume_from is not None else None),
                          config, backend="native")  # metrics.jsonl + callbacks + experiment loggers
    metrics.begin(total_steps, progress["global_step"], progress["samples_seen"])

    def save(hf: bool) -> None:
        """An HF checkpoint (once per pair count) and the training state that goes with it."""
        if hf and progress["last_saved_samples"] != progress["samples_seen"]:
            saved = ckpt.save_hf_checkpoint(model, tokenizer, root, progress["samples_seen"], save_dtype)
            ckpt.prune_hf_checkpoints(root, config.keep_last_n_checkpoints)
            metrics.saved(saved)
            progress["last_saved_samples"] = progress["samples_seen"]
        ckpt.save_training_state(root, model=model, optimizer=optimizer, scheduler=scheduler,
                                 progress={**progress, "elapsed": elapsed()})

    def validate() -> None:
        stats = validation_stats(model, data.validation, val_reference, config.beta, data.max_tokens, device,
                                 autocast)
        epoch = progress["epoch"] + progress["step_in_epoch"] / steps_per_epoch
        metrics.write({"type": "validation", "step": progress["global_step"], "epoch": round(epoch, 6), **stats,
                       "elapsed": round(elapsed(), 4)})
        progress["last_validation"] = stats
        logger.info("validation loss %.4f, reward accuracy %.3f at step %d", stats["loss"], stats["reward_accuracy"],
                    progress["global_step"])

    start_time, prior_elapsed = time.perf_counter(), progress["elapsed"]
    elapsed = lambda: prior_elapsed + time.perf_counter() - start_time  # noqa: E731
    train_seconds, train_tokens, status = 0.0, 0, "success"
    bar = progress_bar(total_steps, progress["global_step"], config.disable_progress_bar, desc="dpo")
    try:
        with stop_on_sigterm() as sigterm:
            while progress["epoch"] < config.num_epochs and progress["global_step"] < total_steps:
                steps = plan_epoch(lengths, effective_batch_size=config.effective_batch_size,
                                   max_tokens_per_gpu=data.max_tokens, seed=config.seed, epoch=progress["epoch"])
                if progress["step_in_epoch"] == 0:
                    metrics.epoch_begin()
                while progress["step_in_epoch"] < len(steps) and progress["global_step"] < total_steps:
                    metrics.step_begin()
                    step = steps[progress["step_in_epoch"]]
                    t0 = time.perf_counter()
                    micros = [(micro, collate_pairs(data.train, micro, device)) for micro in step.micro_batches]
                    stats = step_loss_and_backward(model, micros, reference, config.beta, autocast)
                    clip = config.max_grad_norm or float("inf")
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, clip))
                    lr = scheduler.get_last_lr()[0]
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    seconds = time.perf_counter() - t0
                    train_seconds += seconds
                    train_tokens += step.num_tokens

                    before, epoch = count_step(progress, step, len(steps))
                    progress["last"] = stats
                    loss_tokens = sum(int(row["loss_mask"].sum()) for _, row in micros)
                    record = step_record(step=progress["global_step"], epoch=epoch, loss=stats["loss"], lr=lr,
                                         grad_norm=grad_norm, samples=step.num_samples, tokens=step.num_tokens,
                                         loss_tokens=loss_tokens, seconds=seconds, elapsed=elapsed())
                    metrics.write({**record, **stats})
                    bar.update(1)
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", margin=f"{stats['reward_margin']:.3f}")
                    if progress["global_step"] % config.logging_steps == 0:
                        logger.info("step %d/%d loss %.4f margin %.4f accuracy %.3f lr %.3g grad_norm %.3f",
                                    progress["global_step"], total_steps, stats["loss"], stats["reward_margin"],
                                    stats["reward_accuracy"], lr, grad_norm)

                    after_step(config, progress, before, validate, save)
                    if sigterm["stop"]:
                        break
                if sigterm["stop"]:
                    save(hf=False)
                    status = "stopped"
                    logger.warning("SIGTERM: saved the training state at step %d; resume with resume=True",
                                   progress["global_step"])
                    break
                if progress["step_in_epoch"] < len(steps):  # stopped by max_steps inside the epoch
                    break
                end_of_epoch(config, progress, bool(data.validation), validate, save, metrics)

            # -------------------------------------------------------------------------------------- save
            if status == "success" and config.save_final_checkpoint:
                save(hf=True)
    finally:
        bar.close()
        metrics.close()

    # ------------------------------------------------------------------------------------------- clean up
    checkpoints = ckpt.hf_checkpoints(root)
    last, last_validation = progress["last"], progress.get("last_validation") or {}
    result_metrics = {
        "final_loss": last.get("loss"),
        "final_reward_margin": last.get("reward_margin"),
        "final_reward_accuracy": last.get("reward_accuracy"),
        "validation_loss": last_validation.get("loss"),
        "validation_reward_accuracy": last_validation.get("reward_accuracy"),
        "steps": progress["global_step"],
        "samples": progress["samples_seen"],
        "tokens": progress["tokens_seen"],
        "tokens_per_second": train_tokens / train_seconds if train_seconds > 0 else None,
        "elapsed_seconds": elapsed(),
        "peak_memory_bytes": peak_memory_bytes(device),
        "device": str(device),
        "dropped_or_truncated_samples": data.dropped,
        "metrics_path": str(root / ckpt.METRICS_FILE),
    }
    result = TrainingResult(status=status, checkpoint_path=str(checkpoints[-1]) if checkpoints else None,
                            metrics=result_metrics, output_dir=str(root))
    metrics.end(result)
    return result
