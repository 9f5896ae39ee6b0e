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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training_hub.engine import checkpoint as ckpt
from training_hub.engine.attention import use_packed_attention
from training_hub.engine.batching import check_sample_lengths, pack, pack_into_micro_batches, plan_epoch
from training_hub.engine.loss import step_loss_and_backward, token_loss_sum
from training_hub.engine.method import TrainingMethod
from training_hub.engine.metrics import MetricsWriter, peak_memory_bytes, progress_bar, step_record
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

def check_supported(config) -> None:
    """Refuse what this version cannot do, and warn once about settings it ignores."""
    if config.nproc_per_node not in (1, "auto") or config.nnodes != 1:
        raise ValueError(
            f"nproc_per_node={config.nproc_per_node}, nnodes={config.nnodes}: multi-process training is not "
            "implemented in the native backend yet; run with nproc_per_node=1 and nnodes=1.")
    if config.nproc_per_node == "auto" and torch.cuda.device_count() > 1:
        warnings.warn("nproc_per_node='auto': multi-GPU training is not implemented in the native backend yet; "
                      "training on one GPU.", stacklevel=3)
    ignored = [name for name in ("wandb_project", "tensorboard_log_dir", "mlflow_tracking_uri",
                                 "mlflow_experiment_name") if getattr(config, name)]
    if ignored:
        warnings.warn(f"{', '.join(ignored)}: the native backend does not send metrics to W&B, TensorBoard or "
                      "MLflow yet; they are written to metrics.jsonl in ckpt_output_dir only.", stacklevel=3)
    if config.use_liger:
        warnings.warn("use_liger=True is ignored: the native backend has no Liger kernel integration yet "
                      "(it already avoids full-vocabulary logits for prompt tokens).", stacklevel=3)


def device_and_autocast(dtype: str):
    """CUDA when present, else CPU; bf16 autocast for dtype='bfloat16' (and 'auto' on CUDA), else plain fp32."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    use_bf16 = dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")
    if use_bf16:
        return device, lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return device, contextlib.nullcontext


def prepare_data(config, tokenizer, root: Path) -> Data:
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
def validation_loss(model, dataset, max_tokens: int, device, autocast) -> tuple[float, int]:
    """Mean token loss over the whole validation set, in token-budget micro-batches."""
    model.eval()
    lengths = dataset["length"]
    total, targets = 0.0, 0
    for start in range(0, len(lengths), 512):
        for micro in pack_into_micro_batches(list(range(start, min(start + 512, len(lengths)))), lengths, max_tokens):
            row = collate(dataset, micro, device)
            with autocast():
                total += token_loss_sum(model, row).item()
            targets += int(row["loss_mask"].sum())
    model.train()
    return total / max(targets, 1), targets


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


# ---------------------------------------------------------------------------------------------------- train

def train_sft(config, method: TrainingMethod | None = None) -> TrainingResult:
    """Train ``config.model_path`` on ``config.data_path`` (an ``SFTConfig``) and return a ``TrainingResult``.

    ``method`` adapts the loop for SFT-style algorithms such as OSFT (see ``engine.method``); default plain SFT.
    """
    from transformers import AutoTokenizer

    method = method or TrainingMethod()
    check_supported(config)
    root = Path(config.ckpt_output_dir)
    resume_from = ckpt.check_output_dir(root, config.resume)
    device, autocast = device_and_autocast(config.dtype)
    random.seed(config.seed)
    torch.manual_seed(config.seed)

    tokenizer = AutoTokenizer.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code)
    data = prepare_data(config, tokenizer, root)  # validates all data before anything is written
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

    model, save_dtype = load_model(config, device)
    method.prepare_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, betas=(config.beta1, config.beta2),
                                  eps=config.eps, weight_decay=config.weight_decay, fused=True)  # one kernel
    scheduler = build_scheduler(optimizer, name=config.lr_scheduler, warmup_steps=config.warmup_steps,
                                total_steps=total_steps, scheduler_kwargs=config.lr_scheduler_kwargs)

    progress = {"global_step": 0, "epoch": 0, "step_in_epoch": 0, "samples_seen": 0, "tokens_seen": 0,
                "elapsed": 0.0, "last_saved_samples": None, "last_loss": None, **plan_keys}
    if resume_from is not None:
        saved = ckpt.load_training_state(resume_from, model=model, optimizer=optimizer, scheduler=scheduler,
                                         device=device)
        check_resume_matches(saved, plan_keys)
        progress.update({k: saved[k] for k in progress if k in saved and k not in plan_keys})
        logger.info("resuming from %s (step %d, %d samples seen)", resume_from, saved["global_step"],
                    saved["samples_seen"])
    metrics = MetricsWriter(root / ckpt.METRICS_FILE,
                            keep_through_step=progress["global_step"] if resume_from is not None else None)

    def save(hf: bool) -> None:
        """An HF checkpoint (once per sample count) and the training state that goes with it."""
        if hf and progress["last_saved_samples"] != progress["samples_seen"]:
            ckpt.save_hf_checkpoint(model, tokenizer, root, progress["samples_seen"], save_dtype,
                                    state_dict=method.export_state_dict(model))
            ckpt.prune_hf_checkpoints(root, config.keep_last_n_checkpoints)
            progress["last_saved_samples"] = progress["samples_seen"]
        ckpt.save_training_state(root, model=model, optimizer=optimizer, scheduler=scheduler,
                                 progress={**progress, "elapsed": elapsed()})

    def validate() -> None:
        loss, targets = validation_loss(model, data.validation, data.max_tokens, device, autocast)
        epoch = progress["epoch"] + progress["step_in_epoch"] / steps_per_epoch
        metrics.write({"type": "validation", "step": progress["global_step"], "epoch": round(epoch, 6),
                       "loss": loss, "loss_tokens": targets, "elapsed": round(elapsed(), 4)})
        progress["last_validation_loss"] = loss
        logger.info("validation loss %.4f at step %d", loss, progress["global_step"])

    start_time, prior_elapsed = time.perf_counter(), progress["elapsed"]
    elapsed = lambda: prior_elapsed + time.perf_counter() - start_time  # noqa: E731
    train_seconds, train_tokens, status = 0.0, 0, "success"
    bar = progress_bar(total_steps, progress["global_step"], config.disable_progress_bar)
    try:
        with stop_on_sigterm() as sigterm:
            while progress["epoch"] < config.num_epochs and progress["global_step"] < total_steps:
                steps = plan_epoch(lengths, effective_batch_size=config.effective_batch_size,
                                   max_tokens_per_gpu=data.max_tokens, seed=config.seed, epoch=progress["epoch"])
                while progress["step_in_epoch"] < len(steps) and progress["global_step"] < total_steps:
                    step = steps[progress["step_in_epoch"]]
                    t0 = time.perf_counter()
                    rows = [collate(data.train, micro, device) for micro in step.micro_batches]
                    loss, loss_tokens = step_loss_and_backward(model, rows, autocast)
                    method.before_step(model)
                    clip = config.max_grad_norm or float("inf")
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, clip))
                    lr = scheduler.get_last_lr()[0]
                    optimizer.step()
                    method.after_step(model)
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    seconds = time.perf_counter() - t0
                    train_seconds += seconds
                    train_tokens += step.num_tokens

                    before = progress["samples_seen"]
                    progress["global_step"] += 1
                    progress["step_in_epoch"] += 1
                    progress["samples_seen"] += step.num_samples
                    progress["tokens_seen"] += step.num_tokens
                    progress["last_loss"] = loss
                    epoch = progress["epoch"] + progress["step_in_epoch"] / len(steps)
                    record = step_record(step=progress["global_step"], epoch=epoch, loss=loss, lr=lr,
                                         grad_norm=grad_norm, samples=step.num_samples, tokens=step.num_tokens,
                                         loss_tokens=loss_tokens, seconds=seconds, elapsed=elapsed())
                    metrics.write(record)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_second']:.0f}")
                    if progress["global_step"] % config.logging_steps == 0:
                        logger.info("step %d/%d loss %.4f lr %.3g grad_norm %.3f %.0f tok/s", progress["global_step"],
                                    total_steps, loss, lr, grad_norm, record["tokens_per_second"])

                    if config.eval_steps and progress["global_step"] % config.eval_steps == 0:
                        validate()
                    every = config.save_samples
                    if every and progress["samples_seen"] // every > before // every:
                        save(hf=True)
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
                progress["epoch"] += 1
                progress["step_in_epoch"] = 0
                if data.validation is not None:
                    validate()
                if config.checkpoint_at_epoch:
                    save(hf=True)

            # -------------------------------------------------------------------------------------- save
            if status == "success" and config.save_final_checkpoint:
                save(hf=True)  # still under the SIGTERM handler: a stop request waits for the write to finish
    finally:
        bar.close()
        metrics.close()

    # ------------------------------------------------------------------------------------------- clean up
    checkpoints = ckpt.hf_checkpoints(root)
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
    return TrainingResult(status=status, checkpoint_path=str(checkpoints[-1]) if checkpoints else None,
                          metrics=result_metrics, output_dir=str(root))
