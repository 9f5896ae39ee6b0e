"""The native SFT training loop: setup -> train -> save -> clean up, in one file that reads top to bottom.

``train_sft(config)`` is what the ``native`` backend runs. The pieces it uses are small plain functions:
``batching`` (plan steps into token-budget micro-batches, pack them without padding), ``loss`` (token sum over
the step's loss-bearing tokens), ``schedule`` (warmup + constant/linear/cosine), ``checkpoint`` (HF checkpoints,
training state, resume) and ``metrics`` (metrics.jsonl, progress bar, peak memory).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training_hub.engine import checkpoint as ckpt
from training_hub.engine import distributed
from training_hub.engine.attention import use_packed_attention
from training_hub.engine.batching import check_sample_lengths, pack, pack_into_micro_batches, plan_epoch
from training_hub.engine.loss import step_loss_and_backward, token_loss_sum
from training_hub.engine.method import TrainingMethod
from training_hub.engine.metrics import DiscardMetrics, MetricsWriter, peak_memory_bytes, progress_bar, step_record
from training_hub.engine.schedule import build_scheduler
from training_hub.result import TrainingResult

logger = logging.getLogger(__name__)


@dataclass
class Data:
    """The tokenized training (and optional validation) samples and what the run plans with."""

    train: Any  # datasets.Dataset with input_ids, labels (HF convention, not shifted), length
    validation: Any | None
    max_tokens: int
    summary: Any = None


# ---------------------------------------------------------------------------------------------------- setup

def check_supported(config, ranks: distributed.Ranks) -> None:
    """Refuse what this version cannot do, and warn once about settings it ignores."""
    from training_hub.engine.launch import launch_plan

    if not distributed.in_torchrun_worker() and launch_plan(config).world_size > 1:
        raise ValueError(
            f"nproc_per_node={config.nproc_per_node}, nnodes={config.nnodes}: train_sft() is one process of a run; "
            "start several through sft()/osft() (they launch torchrun) or training_hub.engine.launch.run_training(), "
            "or run your script under torchrun.")
    # W&B / TensorBoard / MLflow: engine.reporter; use_liger and other upstream names: training_hub.compat


def device_and_autocast(dtype: str):
    """CUDA when present, else CPU; bf16 autocast for dtype='bfloat16' (and 'auto' on CUDA), else plain fp32."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    use_bf16 = dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")
    if use_bf16:
        return device, lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return device, contextlib.nullcontext


def prepare_data(config, tokenizer, root: Path, verbose: bool = True) -> Data:
    """Validate and tokenize the training data (and the validation data or split); check every sample fits."""
    from training_hub.data import check_data, prepare_sft_data

    # prepare_sft_data validates every record before it writes its cache (a cache hit means the same bytes
    # were validated before), so a data error leaves ckpt_output_dir untouched; the validation file is
    # checked up front so that its errors, too, come before the training data's cache is written.
    if config.validation_data_path:
        check_data(config.validation_data_path, kind="pretraining" if config.is_pretraining else "chat",
                   document_column_name=config.document_column_name)
    cache = Path(config.data_output_dir) if config.data_output_dir else root / "data_cache"

    def prepare(path: str, name: str):
        return prepare_sft_data(
            path, tokenizer, max_seq_len=config.max_seq_len, is_pretraining=config.is_pretraining,
            block_size=config.block_size, document_column_name=config.document_column_name,
            unmask_messages=config.unmask_messages, truncate_long_samples=config.truncate_long_samples,
            cache_dir=cache / name)

    prepared = prepare(config.data_path, "train")
    if verbose:
        print(prepared.summary.format(), file=sys.stderr)
    train, validation = prepared.dataset, None
    if config.validation_data_path:
        validation = prepare(config.validation_data_path, "validation").dataset
    elif config.validation_split > 0:
        split = train.train_test_split(test_size=config.validation_split, seed=config.seed, shuffle=True)
        train, validation = split["train"], split["test"]
    if len(train) == 0:
        raise ValueError(f"data_path {config.data_path}: no training samples left after preparation")
    max_tokens = config.max_tokens_per_gpu or config.max_seq_len
    check_sample_lengths(train["length"], max_tokens)
    if validation is not None:
        check_sample_lengths(validation["length"], max_tokens, what="validation")
    keep = ["input_ids", "labels", "length"]
    return Data(train.select_columns(keep), validation and validation.select_columns(keep), max_tokens,
                prepared.summary)


def load_model(config, device: torch.device):
    """The model in fp32 (master weights; bf16 runs use autocast), and the dtype its checkpoint was stored in.

    Attention is per-sample SDPA over the packed row when the model supports it (checked numerically, see
    ``attention.use_packed_attention``), else SDPA with transformers' block-diagonal mask from position ids.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    stored = getattr(AutoConfig.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code),
                     "dtype", None)
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    model = AutoModelForCausalLM.from_pretrained(config.model_path, dtype=torch.float32, attn_implementation="sdpa",
                                                 trust_remote_code=config.trust_remote_code).to(device)
    packed = use_packed_attention(model)
    logger.info("attention: %s", "per-sample SDPA" if packed else f"{model.config._attn_implementation}, position-id mask")
    if config.gradient_checkpointing:  # renamed in later transformers 5 releases
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, stored if isinstance(stored, torch.dtype) else torch.float32


def collate(dataset, indices: list[int], device: torch.device) -> dict:
    """Fetch samples by index and pack them into one row (see ``batching.pack``)."""
    rows = dataset[indices]
    return pack(rows["input_ids"], rows["labels"], device=device)


@torch.no_grad()
def validation_loss(model, dataset, max_tokens: int, device, autocast,
                    ranks: distributed.Ranks = distributed.SINGLE) -> tuple[float, int]:
    """Mean token loss over the whole validation set, in token-budget micro-batches (dealt round-robin to ranks)."""
    model.eval()
    lengths = dataset["length"]
    micro_batches = [micro for start in range(0, len(lengths), 512)
                     for micro in pack_into_micro_batches(list(range(start, min(start + 512, len(lengths)))),
                                                          lengths, max_tokens)]
    mine = micro_batches[ranks.rank::ranks.world_size]
    passes = -(-len(micro_batches) // ranks.world_size)  # every rank runs as many forwards (FSDP2 all-gathers)
    total, targets = 0.0, 0
    for k in range(passes):
        row = collate(dataset, mine[k], device) if k < len(mine) else distributed.empty_micro_batch(device)
        with autocast():
            total += token_loss_sum(model, row).item()
        targets += int(row["loss_mask"].sum())
    total, targets = distributed.all_sum(ranks, total, targets)
    model.train()
    return total / max(targets, 1), int(targets)


@contextlib.contextmanager
def stop_on_sigterm():
    """Turn SIGTERM into a flag the loop checks after each optimizer step (then it saves state and stops)."""
    flag = {"stop": False}
    try:
        previous = signal.signal(signal.SIGTERM, lambda *_: flag.__setitem__("stop", True))
    except ValueError:  # not the main thread: no handler, SIGTERM keeps its default meaning
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_resume_matches(saved: dict, current: dict) -> None:
    """A resumed run must plan the same steps as the run it continues."""
    changed = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in current.items() if saved.get(k) != v]
    if changed:
        raise ValueError("resume=True: these settings differ from the run being resumed, so its data order cannot "
                         "be continued: " + "; ".join(changed) + ". Use the original values or a new ckpt_output_dir.")


def count_step(progress: dict, step, steps_in_epoch: int) -> tuple[int, float]:
    """Advance the progress counters past one optimizer step of our loops; return (samples seen before it, the
    fractional epoch after it)."""
    before = progress["samples_seen"]
    progress["global_step"] += 1
    progress["step_in_epoch"] += 1
    progress["samples_seen"] += step.num_samples
    progress["tokens_seen"] += step.num_tokens
    return before, progress["epoch"] + progress["step_in_epoch"] / steps_in_epoch


def after_step(config, progress: dict, samples_before: int, validate, save) -> None:
    """The per-step schedule of our loops: validation every ``eval_steps``, a checkpoint every ``save_samples``."""
    if config.eval_steps and progress["global_step"] % config.eval_steps == 0:
        validate()
    every = config.save_samples
    if every and progress["samples_seen"] // every > samples_before // every:
        save(hf=True)


def end_of_epoch(config, progress: dict, has_validation: bool, validate, save, metrics) -> None:
    """Advance to the next epoch; validate and (with ``checkpoint_at_epoch``) save the one just finished, then
    tell the callbacks (``metrics`` is the run's RunReporter)."""
    progress["epoch"] += 1
    progress["step_in_epoch"] = 0
    if has_validation:
        validate()
    if config.checkpoint_at_epoch:
        save(hf=True)
    metrics.epoch_end()


# ---------------------------------------------------------------------------------------------------- train

def train_sft(config, method: TrainingMethod | None = None) -> TrainingResult:
    """Train ``config.model_path`` on ``config.data_path`` (an ``SFTConfig``) and return a ``TrainingResult``.

    ``method`` adapts the loop for SFT-style algorithms such as OSFT (see ``engine.method``); default plain SFT.
    Inside a torchrun worker this is one rank of the run (see ``engine.distributed``): every rank returns the
    same result, rank 0 alone writes.
    """
    from transformers import AutoTokenizer

    method = method or TrainingMethod()
    ranks = distributed.setup(config.strategy)
    check_supported(config, ranks)
    root = Path(config.ckpt_output_dir)
    resume_from = distributed.broadcast(ranks, ckpt.check_output_dir(root, config.resume) if ranks.is_main else None)
    device, autocast = device_and_autocast(config.dtype)
    random.seed(config.seed)
    torch.manual_seed(config.seed)

    tokenizer = AutoTokenizer.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code)
    with distributed.main_first(ranks):  # the others then find rank 0's cache
        data = prepare_data(config, tokenizer, root, verbose=ranks.is_main)  # validates all data before any write
    root.mkdir(parents=True, exist_ok=True)
    lengths = data.train["length"]
    steps_per_epoch = math.ceil(len(lengths) / config.effective_batch_size)
    total_steps = steps_per_epoch * config.num_epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    build_scheduler(torch.optim.SGD([torch.zeros(1)], lr=1.0), name=config.lr_scheduler,  # check options early
                    warmup_steps=config.warmup_steps, total_steps=total_steps,
                    scheduler_kwargs=config.lr_scheduler_kwargs)
    plan_keys = {"seed": config.seed, "effective_batch_size": config.effective_batch_size,
                 "max_tokens_per_gpu": data.max_tokens, "num_train_samples": len(lengths),
                 "model_path": str(config.model_path), **method.plan_keys()}

    raw, save_dtype = load_model(config, device)
    method.prepare_model(raw)
    model = distributed.wrap_model(raw, ranks, device)  # what the loop calls: raw, DDP(raw) or raw made FSDP2
    trainable = [p for p in raw.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, betas=(config.beta1, config.beta2),
                                  eps=config.eps, weight_decay=config.weight_decay, fused=True)  # one kernel
    scheduler = build_scheduler(optimizer, name=config.lr_scheduler, warmup_steps=config.warmup_steps,
                                total_steps=total_steps, scheduler_kwargs=config.lr_scheduler_kwargs)

    progress = {"global_step": 0, "epoch": 0, "step_in_epoch": 0, "samples_seen": 0, "tokens_seen": 0,
                "elapsed": 0.0, "last_saved_samples": None, "last_loss": None, **plan_keys}
    if resume_from is not None:
        if ranks.fsdp:  # rank 0 reads the full state, every rank loads its shards
            distributed.load_full_training_state(model, optimizer, resume_from, ranks)
        saved = ckpt.load_training_state(resume_from, model=None if ranks.fsdp else raw,
                                         optimizer=None if ranks.fsdp else optimizer, scheduler=scheduler,
                                         device=device)
        check_resume_matches(saved, plan_keys)
        progress.update({k: saved[k] for k in progress if k in saved and k not in plan_keys})
        logger.info("resuming from %s (step %d, %d samples seen)", resume_from, saved["global_step"],
                    saved["samples_seen"])
    metrics = MetricsWriter(root / ckpt.METRICS_FILE,
                            keep_through_step=progress["global_step"] if resume_from is not None else None
                            ) if ranks.is_main else DiscardMetrics()
    from training_hub.engine.reporter import RunReporter  # metrics.jsonl + callbacks + experiment loggers

    metrics = RunReporter(metrics, config, backend="native", enabled=ranks.is_main)
    metrics.begin(total_steps, progress["global_step"], progress["samples_seen"])

    def save(hf: bool) -> None:
        """An HF checkpoint (once per sample count) and the training state that goes with it."""
        if hf and progress["last_saved_samples"] != progress["samples_seen"]:
            gathered = distributed.full_model_state(model, ranks)  # FSDP2: every rank takes part; else None
            if ranks.is_main:
                weights = method.export_state_dict(raw) if gathered is None else (
                    method.export_state_dict(raw, gathered) or gathered)
                saved = ckpt.save_hf_checkpoint(raw, tokenizer, root, progress["samples_seen"], save_dtype,
                                                state_dict=weights, save_model=method.save_model)
                ckpt.prune_hf_checkpoints(root, config.keep_last_n_checkpoints)
                metrics.saved(saved)
            progress["last_saved_samples"] = progress["samples_seen"]
        model_state, optimizer_state = distributed.full_training_state(model, optimizer, ranks)
        if ranks.is_main:
            ckpt.save_training_state(root, model=raw, optimizer=optimizer, scheduler=scheduler,
                                     progress={**progress, "elapsed": elapsed()}, model_state=model_state,
                                     optimizer_state=optimizer_state)

    def validate() -> None:
        loss, targets = validation_loss(model, data.validation, data.max_tokens, device, autocast, ranks)
        epoch = progress["epoch"] + progress["step_in_epoch"] / steps_per_epoch
        metrics.write({"type": "validation", "step": progress["global_step"], "epoch": round(epoch, 6),
                       "loss": loss, "loss_tokens": targets, "elapsed": round(elapsed(), 4)})
        progress["last_validation_loss"] = loss
        logger.info("validation loss %.4f at step %d", loss, progress["global_step"])

    start_time, prior_elapsed = time.perf_counter(), progress["elapsed"]
    elapsed = lambda: prior_elapsed + time.perf_counter() - start_time  # noqa: E731
    train_seconds, train_tokens, status = 0.0, 0, "success"
    bar = progress_bar(total_steps, progress["global_step"], config.disable_progress_bar or not ranks.is_main)
    try:
        with stop_on_sigterm() as sigterm:
            while progress["epoch"] < config.num_epochs and progress["global_step"] < total_steps:
                steps = plan_epoch(lengths, effective_batch_size=config.effective_batch_size,
                                   max_tokens_per_gpu=data.max_tokens, seed=config.seed, epoch=progress["epoch"],
                                   num_ranks=ranks.world_size, rank=ranks.rank)
                if progress["step_in_epoch"] == 0:
                    metrics.epoch_begin()
                while progress["step_in_epoch"] < len(steps) and progress["global_step"] < total_steps:
                    metrics.step_begin()
                    step = steps[progress["step_in_epoch"]]
                    t0 = time.perf_counter()
                    rows = [collate(data.train, micro, device) for micro in step.micro_batches]
                    if ranks.distributed:  # same number of passes on every rank; loss tokens counted globally
                        rows += [distributed.empty_micro_batch(device)] * (step.max_micro_batches - len(rows))
                        local_targets = sum(int(row["loss_mask"].sum()) for row in rows)
                        (global_targets,) = distributed.all_sum(ranks, local_targets)
                        loss, loss_tokens = step_loss_and_backward(
                            model, rows, autocast, total_targets=int(global_targets), grad_scale=ranks.world_size,
                            accumulate=distributed.no_sync(model))
                        loss, stop = distributed.all_sum(ranks, loss, float(sigterm["stop"]))
                        sigterm["stop"] = stop > 0  # every rank stops after the same step
                    else:
                        loss, loss_tokens = step_loss_and_backward(model, rows, autocast)
                    method.before_step(raw)
                    clip = config.max_grad_norm or float("inf")
                    grad_norm = distributed.grad_norm_value(torch.nn.utils.clip_grad_norm_(trainable, clip))
                    lr = scheduler.get_last_lr()[0]
                    optimizer.step()
                    method.after_step(raw)
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    seconds = time.perf_counter() - t0
                    train_seconds += seconds
                    train_tokens += step.num_tokens

                    before, epoch = count_step(progress, step, len(steps))
                    progress["last_loss"] = loss
                    record = step_record(step=progress["global_step"], epoch=epoch, loss=loss, lr=lr,
                                         grad_norm=grad_norm, samples=step.num_samples, tokens=step.num_tokens,
                                         loss_tokens=loss_tokens, seconds=seconds, elapsed=elapsed())
                    metrics.write(record)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_second']:.0f}")
                    if progress["global_step"] % config.logging_steps == 0:
                        logger.info("step %d/%d loss %.4f lr %.3g grad_norm %.3f %.0f tok/s", progress["global_step"],
                                    total_steps, loss, lr, grad_norm, record["tokens_per_second"])

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
                end_of_epoch(config, progress, data.validation is not None, validate, save, metrics)

            # -------------------------------------------------------------------------------------- save
            if status == "success" and config.save_final_checkpoint:
                save(hf=True)  # still under the SIGTERM handler: a stop request waits for the write to finish
    finally:
        bar.close()
        metrics.close()

    # ------------------------------------------------------------------------------------------- clean up
    checkpoints = distributed.broadcast(ranks, ckpt.hf_checkpoints(root) if ranks.is_main else None)
    result_metrics = {
        "final_loss": progress["last_loss"],
        "validation_loss": progress.get("last_validation_loss"),
        "steps": progress["global_step"],
        "samples": progress["samples_seen"],
        "tokens": progress["tokens_seen"],
        "tokens_per_second": train_tokens / train_seconds if train_seconds > 0 else None,
        "elapsed_seconds": elapsed(),
        "peak_memory_bytes": peak_memory_bytes(device),
        "device": str(device),
        "metrics_path": str(root / ckpt.METRICS_FILE),
    }
    if ranks.distributed:
        result_metrics.update(num_processes=ranks.world_size, strategy=ranks.strategy)
        result_metrics = distributed.broadcast(ranks, result_metrics)  # rank 0's clock and memory
    distributed.teardown(ranks)
    result = TrainingResult(status=status, checkpoint_path=str(checkpoints[-1]) if checkpoints else None,
                            metrics=result_metrics, output_dir=str(root))
    metrics.end(result)
    return result
