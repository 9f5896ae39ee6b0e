"""The ``trl`` backends: TRL's trainers (and PEFT through them) behind our parameter declarations.

* ``TRLSFTBackend``      ``sft``       TRL ``SFTTrainer``, loss on assistant tokens only (``assistant_only_loss``)
* ``TRLDPOBackend``      ``dpo``       TRL ``DPOTrainer`` against a frozen copy of the starting model
* ``TRLLoRASFTBackend``  ``lora_sft``  TRL ``SFTTrainer`` with a PEFT ``LoraConfig`` (QLoRA where CUDA and
                                       bitsandbytes exist); optional merge via :mod:`training_hub.lora_merge`

Each turns the plain parameter dict into its typed config at the top, reports what TRL cannot do here as one
``ValueError`` before any model or data is loaded, and imports torch/transformers/trl inside ``execute_training``.

How our parameters map onto TRL / ``transformers.TrainingArguments``:

* ``effective_batch_size`` = ``per_device_train_batch_size`` x ``gradient_accumulation_steps`` x processes; the
  micro-batch is the largest divisor of the per-process batch whose padded rows fit ``max_tokens_per_gpu``
  (a DPO pair is two rows of up to ``max_length`` tokens).
* Length policy is ours, applied to TRL's tokenized dataset: samples longer than ``max_seq_len`` (DPO:
  ``max_length``) are dropped, or truncated with ``truncate_long_samples=True``; DPO prompts are cut to their last
  ``max_prompt_length`` tokens first.
* Schedules are ``transformers``' (warmup counts from 0, not from 1/warmup_steps as in the native engine);
  ``lr_scheduler_kwargs={'min_lr_ratio': r}`` is supported for cosine.
* Layout of ``ckpt_output_dir``: ``metrics.jsonl`` (one line per optimizer step, written by a TrainerCallback),
  ``trl_state/checkpoint-<step>`` (TRL's intermediate checkpoints, for ``resume``), ``hf_format/samples_<N>`` (the
  final model; for LoRA the adapter in PEFT format), ``merged/`` (LoRA with ``merge=True``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, ClassVar, Dict

from training_hub.backends.common import (
    BuiltinBackend, add_lora_models, availability_of, missing_modules, native_only_problems, qlora_problems,
)
from training_hub.backends import trl_checkpoints
from training_hub.backends.trl_bridge import hub_bridge
from training_hub.config.algorithms import DPOConfig, LoRASFTConfig, SFTConfig
from training_hub.config.groups import fsdp_cpu_offload
from training_hub.config.processes import in_torchrun_worker, process_count
from training_hub.registry import Availability

logger = logging.getLogger("training_hub")

METRICS_FILE = "metrics.jsonl"
STATE_DIR = "trl_state"
PLAN_FILE = "run_plan.json"  # in STATE_DIR: what a resumed run must share with this one
HF_DIR = "hf_format"
MERGED_DIR = "merged"

# TRL's log keys -> our metrics.jsonl keys (the native engine's names where it has them).
_LOG_KEYS = {
    "loss": "loss", "learning_rate": "lr", "grad_norm": "grad_norm", "epoch": "epoch",
    "rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy",
    "rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected",
    "logps/chosen": "logps_chosen", "logps/rejected": "logps_rejected",
    "mean_token_accuracy": "token_accuracy", "num_tokens": "tokens_seen", "entropy": "entropy",
}


# ------------------------------------------------------------------------------------------------ checks


def _unsupported(config, algorithm: str) -> list[str]:
    """What TRL cannot do with this config here: each a line of the one ValueError raised before any work."""
    problems = native_only_problems(config)
    if not in_torchrun_worker() and process_count(config) > 1:
        problems.append("nproc_per_node/nnodes: the trl backend runs in the calling process; for several "
                        "processes launch your script with torchrun (or use backend='native')")
    if config.strategy == "fsdp2":
        problems.append(f"strategy: {config.strategy!r} is not wired into the trl backend (use backend='native')")
    if fsdp_cpu_offload(config.fsdp_options):
        problems.append("fsdp_options: CPU offload is not wired into the trl backend (use backend='native' with "
                        "strategy='fsdp2')")
    if config.resume_changes:
        problems.append("resume_changes: the trl backend continues a run exactly as saved (TRL restores its "
                        "schedule from the checkpoint); use backend='native' to resume with changed settings")
    if config.save_samples and config.checkpoint_at_epoch:
        problems.append("save_samples/checkpoint_at_epoch: the trl backend saves either every N samples or at "
                        "every epoch, not both")
    if config.save_samples and config.save_samples % config.effective_batch_size:
        problems.append(f"save_samples: must be a multiple of effective_batch_size ({config.effective_batch_size}) "
                        "for the trl backend, which saves on optimizer steps")
    kwargs = dict(config.lr_scheduler_kwargs or {})
    ratio = kwargs.pop("min_lr_ratio", None)
    if kwargs:
        problems.append(f"lr_scheduler_kwargs: unknown option(s) {', '.join(sorted(kwargs))}; "
                        "the trl backend knows only 'min_lr_ratio'")
    if ratio is not None and config.lr_scheduler != "cosine":
        problems.append("lr_scheduler_kwargs: min_lr_ratio works only with lr_scheduler='cosine' in the trl backend")
    if ratio is not None and not (isinstance(ratio, (int, float)) and 0.0 <= ratio <= 1.0):
        problems.append(f"lr_scheduler_kwargs: min_lr_ratio must be within [0, 1], got {ratio!r}")
    if algorithm != "dpo":
        if config.is_pretraining:
            problems.append("is_pretraining: the trl backend trains on chat data only (use backend='native')")
        if config.unmask_messages:
            problems.append("unmask_messages: the trl backend puts loss on assistant tokens only "
                            "(use backend='native')")
    if getattr(config, "load_in_4bit", False):
        problems.extend(qlora_problems())
    for name, module in (("wandb_project", "wandb"), ("tensorboard_log_dir", "tensorboard"),
                         ("mlflow_tracking_uri", "mlflow")):
        if getattr(config, name) and missing_modules(module):
            problems.append(f"{name}: needs the '{module}' package, which is not installed")
    return problems


def _check_output_dir(root: Path, resume: bool) -> str | None:
    """Refuse to overwrite a finished or running run unless resuming; return TRL's checkpoint to resume from."""
    state = root / STATE_DIR
    checkpoints = sorted(state.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])) \
        if state.is_dir() else []
    if resume and checkpoints:
        return str(checkpoints[-1])
    found = [str(p.relative_to(root)) for p in (root / METRICS_FILE, root / HF_DIR, state) if p.exists()]
    if resume and found:  # starting over here would mix this run's files with a new one's
        from training_hub.engine.checkpoint import ExistingRunError

        raise ExistingRunError(f"resume=True: ckpt_output_dir {root} holds a run ({', '.join(found)}) but no TRL "
                               "checkpoint to continue from. Start the new run in another ckpt_output_dir.")
    if resume:
        return None
    if found:
        from training_hub.engine.checkpoint import ExistingRunError  # the native engine's error, same meaning

        raise ExistingRunError(f"ckpt_output_dir {root} already holds a training run ({', '.join(found)}). Pass "
                         "resume=True to continue it, or choose another ckpt_output_dir (or delete this one).")
    return None


def _open_output_dir(config, root: Path) -> tuple[str | None, dict]:
    """:func:`_check_output_dir` after ``checkpoint_storage``'s restore; with ``enable_jit_checkpoint`` or a storage
    URL a run resumes from its newest checkpoint by itself (``engine.storage.open_output_dir``). Returns the TRL
    checkpoint to resume from and this call's run plan, which a resumed run must share with the saved one (the
    same settings and the same data bytes, as the native engine requires); save it with :func:`_save_run_plan`."""
    from training_hub.data.sources import fingerprint
    from training_hub.engine.run import Progress, run_plan
    from training_hub.engine.storage import open_output_dir

    resume_from = open_output_dir(config, root, kind=STATE_DIR, check=_check_output_dir)
    plan = run_plan(config, fingerprint(config.data_path), backend="trl")
    saved = root / STATE_DIR / PLAN_FILE
    if resume_from is not None and saved.is_file():  # TRL's own resume would continue on changed data silently
        Progress(plan=plan).restore({"plan": json.loads(saved.read_text())}, changeable=frozenset())
    return resume_from, plan


def _save_run_plan(root: Path, plan: dict) -> None:
    (root / STATE_DIR).mkdir(parents=True, exist_ok=True)
    (root / STATE_DIR / PLAN_FILE).write_text(json.dumps(plan, indent=1, sort_keys=True))


# ------------------------------------------------------------------------------------------------ arguments


def _micro_batch(per_process: int, row_tokens: int, budget: int) -> int:
    """The largest divisor of ``per_process`` whose padded rows fit ``budget`` tokens (at least 1)."""
    fits = max(1, budget // max(1, row_tokens))
    return max(d for d in range(1, per_process + 1) if per_process % d == 0 and d <= fits)


def training_arguments(config, args_class: type, *, root: Path, row_tokens: int, rows_per_sample: int = 1,
                       **extra: Any):
    """``args_class`` (TRL's SFTConfig/DPOConfig) filled from our declared parameters."""
    import torch

    world = process_count(config)
    if config.effective_batch_size % world:
        raise ValueError(f"effective_batch_size: {config.effective_batch_size} is not divisible by the "
                         f"{world} processes")
    per_process = config.effective_batch_size // world
    budget = config.max_tokens_per_gpu or config.max_seq_len
    micro = _micro_batch(per_process, row_tokens * rows_per_sample, budget)
    from training_hub.engine.model import compute_dtype

    cuda = torch.cuda.is_available()
    bf16 = compute_dtype(config, torch.device("cuda" if cuda else "cpu")) == torch.bfloat16  # as native
    scheduler, scheduler_kwargs = {"constant": "constant_with_warmup", "linear": "linear",
                                   "cosine": "cosine"}[config.lr_scheduler], {}
    ratio = (config.lr_scheduler_kwargs or {}).get("min_lr_ratio")
    if ratio is not None:
        scheduler, scheduler_kwargs = "cosine_with_min_lr", {"min_lr_rate": float(ratio)}
    if config.save_samples:
        save = {"save_strategy": "steps", "save_steps": config.save_samples // config.effective_batch_size}
    elif config.checkpoint_at_epoch:
        save = {"save_strategy": "epoch"}
    else:
        save = {"save_strategy": "no"}
    # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing (the old name warns).
    fields = {f.name for f in dataclasses.fields(args_class)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    from training_hub.engine.model import checkpointing as resolve

    extra[checkpointing] = resolve(config.gradient_checkpointing, torch.device("cuda" if cuda else "cpu"))
    return args_class(
        output_dir=str(root / STATE_DIR),
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=micro,
        gradient_accumulation_steps=per_process // micro,
        learning_rate=config.learning_rate,
        adam_beta1=config.beta1,
        adam_beta2=config.beta2,
        adam_epsilon=config.eps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm or 0.0,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps or -1,
        lr_scheduler_type=scheduler,
        lr_scheduler_kwargs=scheduler_kwargs,
        warmup_steps=config.warmup_steps,
        seed=config.seed,
        data_seed=config.seed,
        bf16=bf16,
        fp16=False,
        use_cpu=not cuda,
        use_liger_kernel=config.use_liger and cuda and importlib.util.find_spec("liger_kernel") is not None,
        logging_steps=1,  # metrics.jsonl gets every optimizer step
        disable_tqdm=config.disable_progress_bar,
        save_total_limit=config.keep_last_n_checkpoints,
        report_to=_report_to(config),
        run_name=config.wandb_run_name or config.mlflow_run_name,
        trust_remote_code=config.trust_remote_code,
        dataloader_num_workers=0,
        **save,
        **extra,
    )


def _report_to(config) -> list[str]:
    """The experiment trackers asked for; their settings travel as the environment variables they read."""
    report = []
    if config.wandb_project:
        report.append("wandb")
        os.environ["WANDB_PROJECT"] = config.wandb_project
        if config.wandb_entity:
            os.environ["WANDB_ENTITY"] = config.wandb_entity
    if config.tensorboard_log_dir:
        report.append("tensorboard")
        os.environ["TENSORBOARD_LOGGING_DIR"] = config.tensorboard_log_dir
    if config.mlflow_tracking_uri or config.mlflow_experiment_name:
        report.append("mlflow")
        if config.mlflow_tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = config.mlflow_tracking_uri
        if config.mlflow_experiment_name:
            os.environ["MLFLOW_EXPERIMENT_NAME"] = config.mlflow_experiment_name
    return report


def _eval_arguments(config, has_validation: bool) -> dict:
    if not has_validation:
        return {"eval_strategy": "no"}
    if config.eval_steps:
        return {"eval_strategy": "steps", "eval_steps": config.eval_steps}
    return {"eval_strategy": "epoch"}


# ------------------------------------------------------------------------------------------------ data


def _split(records: list, config) -> tuple[list, list | None]:
    """Training records and validation records (from validation_data_path or validation_split)."""
    import random

    if config.validation_split > 0:
        order = list(range(len(records)))
        random.Random(config.seed).shuffle(order)
        n_val = max(1, round(len(records) * config.validation_split))
        if n_val >= len(records):
            raise ValueError(f"validation_split: {config.validation_split} leaves no training sample "
                             f"out of {len(records)}")
        held = set(order[:n_val])
        return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]
    return records, None


def _sft_length_policy(trainer, config) -> int:
    """Apply our length policy to SFTTrainer's tokenized dataset (it holds input_ids and labels)."""
    max_len = config.max_seq_len

    def truncate(ex):
        n = len(ex["input_ids"])
        return {k: v[:max_len] for k, v in ex.items() if isinstance(v, list) and len(v) == n}

    def policy(dataset, what):
        from training_hub.data.preference import length_policy

        return length_policy(dataset, max_len=max_len, truncate=config.truncate_long_samples,
                              length_fn=lambda ex: len(ex["input_ids"]), truncate_fn=truncate, what=what)

    trainer.train_dataset, dropped = policy(trainer.train_dataset, "sft (trl)")
    if trainer.eval_dataset is not None:
        trainer.eval_dataset, _ = policy(trainer.eval_dataset, "sft (trl) validation")
    return dropped


# ------------------------------------------------------------------------------------------------ running


def _metrics_callback(path: Path, keep_through_step: int | None):
    """A TrainerCallback that appends one JSON line per optimizer step to ``path`` (TRL logs every step)."""
    from transformers import TrainerCallback

    from training_hub.engine.metrics import trim_metrics

    class MetricsJSONL(TrainerCallback):
        def __init__(self):
            trim_metrics(path, keep_through_step)  # resume: keep the lines up to the saved state
            self.start = time.perf_counter()
            self.last: dict = {}
            self.last_validation: dict = {}

        def record(self, state, logs):
            """(kind, metrics.jsonl record) of a Trainer log, or None for logs that are not a step's metrics."""
            if not logs:
                return None
            kind = "validation" if any(k.startswith("eval_") for k in logs) else "train"
            if kind == "train" and "loss" not in logs:  # the end-of-training summary (train_runtime, ...)
                return None
            record = {"type": kind, "step": state.global_step}
            if kind == "train":
                record["max_steps"] = state.max_steps  # progress readers (Kubeflow's) use it, as upstream writes it
            for key, value in logs.items():
                name = key[len("eval_"):] if kind == "validation" and key.startswith("eval_") else key
                record[_LOG_KEYS.get(name, name.replace("/", "_"))] = value
            record["elapsed"] = round(time.perf_counter() - self.start, 4)
            return kind, record

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero:
                return
            found = self.record(state, logs)
            if not found:
                return
            kind, record = found
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if kind == "train":
                self.last = record
            else:
                self.last_validation = record

    return MetricsJSONL()


def _resume_step(checkpoint: str | None) -> int | None:
    return int(checkpoint.rsplit("-", 1)[-1]) if checkpoint else None


def _load_tokenizer(config):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_model(config, quantization_config=None):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: Dict[str, Any] = {"dtype": torch.float32, "trust_remote_code": config.trust_remote_code}
    if quantization_config is not None:
        kwargs.update(dtype=torch.bfloat16, quantization_config=quantization_config, device_map={"": 0})
    return AutoModelForCausalLM.from_pretrained(config.model_path, **kwargs)


def _train_and_save(trainer, config, root: Path, resume_from: str | None, callback, *, cast_back: bool = True):
    """Run ``trainer``, save the final model as ``hf_format/samples_<N>`` (atomically), return (path, metrics)."""
    from training_hub.engine.checkpoint import atomic_directory

    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - start
    state = trainer.state
    samples = min(state.global_step * config.effective_batch_size, len(trainer.train_dataset) * config.num_epochs)
    path = None
    if config.save_final_checkpoint and trainer.is_world_process_zero():
        path = root / HF_DIR / f"samples_{samples}"
        if cast_back:  # trained in fp32: store the weights in the dtype the starting checkpoint had
            from training_hub.engine.model import stored_dtype

            trainer.model.to(stored_dtype(config.model_path, config.trust_remote_code))
        with atomic_directory(path) as tmp:
            trainer.save_model(str(tmp))
            trainer.processing_class.save_pretrained(str(tmp))
    last = callback.last
    metrics = {
        "final_loss": last.get("loss"),
        "validation_loss": callback.last_validation.get("loss"),
        "steps": state.global_step,
        "samples": samples,
        "train_loss_mean": output.training_loss,
        "elapsed_seconds": round(seconds, 4),
        "metrics_path": str(root / METRICS_FILE),
        "engine": "trl",
    }
    return path, metrics, last


class _TRLBackend(BuiltinBackend):
    """Shared parts: availability and what TRL cannot do here (``refusals``, checked before any work)."""

    name = "trl"
    needs: ClassVar[tuple[str, ...]] = ("torch", "transformers", "datasets", "trl", "accelerate")
    upstream_handles: ClassVar[tuple[str, ...]] = ("use_liger",)  # on CUDA; see training_hub.config.upstream
    upstream_needs: ClassVar[dict[str, str]] = {"use_liger": "liger_kernel"}
    install_hint: ClassVar[str] = "pip install training-hub[trl]"

    @classmethod
    def is_available(cls) -> Availability:
        return availability_of(cls.needs, cls.install_hint)

    @classmethod
    def refusals(cls, config, given: set[str]) -> list[str]:
        """What TRL cannot do with this call here."""
        return _unsupported(config, cls.algorithm)


# ------------------------------------------------------------------------------------------------ SFT / LoRA


class TRLSFTBackend(_TRLBackend):
    """SFT with TRL's ``SFTTrainer``: chat data, loss on the assistant tokens (``assistant_only_loss=True``)."""

    algorithm = "sft"
    saves_adapter: ClassVar[bool] = False  # LoRA saves the adapter (left in its training dtype)

    @classmethod
    def config_class(cls) -> type:
        return SFTConfig

    def run(self, config, given: set[str], options: Dict[str, Any]) -> Any:
        return self._run_sft(config)

    def peft_config(self, config, model):
        return None

    def _run_sft(self, config):
        from training_hub.data.validate import read_records

        records = read_records(config.data_path, kind="chat")  # DataValidationError before any model loads
        if any(item["unmask"] for item in records.items):
            first = next(i for i, item in enumerate(records.items) if item["unmask"])
            raise ValueError(f"{records.where(first)}: unmask: true is not supported by the trl backend, which "
                             "puts loss on assistant tokens only (use backend='native')")
        train, validation = _split([{"messages": r["messages"]} for r in records.items], config)
        if config.validation_data_path:
            validation = [{"messages": r["messages"]} for r in read_records(config.validation_data_path).items]
        root = Path(config.ckpt_output_dir)
        resume_from, plan = _open_output_dir(config, root)
        from training_hub.fsutil import claim_directory
        with claim_directory(root):  # creates root; one live run per output directory
            _save_run_plan(root, plan)

            from datasets import Dataset
            from trl import SFTConfig as TRLSFTConfig
            from trl import SFTTrainer

            tokenizer = _load_tokenizer(config)
            quantization = _bnb_config() if getattr(config, "load_in_4bit", False) else None
            model = _load_model(config, quantization)
            args = training_arguments(
                config, TRLSFTConfig, root=root, row_tokens=config.max_seq_len,
                assistant_only_loss=True, max_length=None, packing=False, dataset_num_proc=None,
                **_eval_arguments(config, validation is not None))
            callback = _metrics_callback(root / METRICS_FILE, _resume_step(resume_from))
            bridge = hub_bridge(config, callback.record)  # TrainingHubCallback hooks
            extra, mirror, jit = trl_checkpoints.checkpoint_callbacks(config, root, STATE_DIR)
            trainer = SFTTrainer(
                model=model, args=args, processing_class=tokenizer,
                train_dataset=Dataset.from_list(train),
                eval_dataset=Dataset.from_list(validation) if validation else None,
                peft_config=self.peft_config(config, model), callbacks=[callback, bridge, *extra])
            dropped = _sft_length_policy(trainer, config)
            try:
                path, metrics, _ = _train_and_save(trainer, config, root, resume_from, callback,
                                                   cast_back=not self.saves_adapter)
            except Exception:
                trl_checkpoints.abandon(mirror)
                raise
            bridge.saved(path)
            metrics.update(dropped_or_truncated_samples=dropped, **bridge.ctx.extra)  # stopped_by: a hook's stop
            result = trl_checkpoints.finish(self._result(config, trainer, path, metrics, root), mirror, jit)
            bridge.end(result)
            return result

    def _result(self, config, trainer, path, metrics, root):
        from training_hub.result import TrainingResult

        return TrainingResult(status="success", checkpoint_path=str(path) if path else None, metrics=metrics,
                              output_dir=str(root))


def _bnb_config():
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


class TRLLoRASFTBackend(TRLSFTBackend):
    """LoRA SFT with TRL's ``SFTTrainer`` and a PEFT ``LoraConfig``; the result is the adapter in PEFT format.

    ``checkpoint_path`` is the adapter directory; with ``merge=True`` the merged checkpoint is in
    ``result["merged_path"]`` (also ``result.metrics["merged_path"]``).
    """

    algorithm = "lora_sft"
    saves_adapter = True
    needs = _TRLBackend.needs + ("peft",)
    install_hint = "pip install training-hub[trl,peft]"

    @classmethod
    def config_class(cls) -> type:
        return LoRASFTConfig

    def peft_config(self, config, model):
        from peft import LoraConfig

        if config.load_in_4bit:
            from peft import prepare_model_for_kbit_training

            prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing is not False)
        return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=_target_modules(config.target_modules), use_dora=config.use_dora,
                          bias="none", task_type="CAUSAL_LM")

    def _result(self, config, trainer, path, metrics, root):
        result = super()._result(config, trainer, path, metrics, root)
        if config.merge and path is not None:
            from training_hub.lora_merge import merge_adapter

            merged = merge_adapter(path, root / MERGED_DIR)
            result.metrics["merged_path"] = str(merged)
            result.extra["merged_path"] = str(merged)
        return add_lora_models(result, config)


def _target_modules(names):
    if names is None or names == ["all-linear"]:
        return "all-linear"  # upstream's default: every linear projection except the output layer
    return list(names)


# ------------------------------------------------------------------------------------------------ DPO


class TRLDPOBackend(_TRLBackend):
    """DPO with TRL's ``DPOTrainer``; data from :func:`training_hub.data.load_preference_data`.

    The reference model is a frozen copy of the starting model. Per step, metrics.jsonl records the loss, the
    learning rate and TRL's reward statistics (``reward_margin``, ``reward_accuracy``, ``reward_chosen``,
    ``reward_rejected``) for that step's pairs.
    """

    algorithm = "dpo"

    @classmethod
    def config_class(cls) -> type:
        return DPOConfig

    def run(self, config, given: set[str], options: Dict[str, Any]) -> Any:
        from training_hub.data.validate import load_preference_data

        pairs = load_preference_data(config.data_path)  # DataValidationError before any model loads
        train, validation = _split(pairs, config)
        if config.validation_data_path:
            validation = load_preference_data(config.validation_data_path)
        root = Path(config.ckpt_output_dir)
        resume_from, plan = _open_output_dir(config, root)
        from training_hub.fsutil import claim_directory
        with claim_directory(root):  # creates root; one live run per output directory
            _save_run_plan(root, plan)

            from trl import DPOConfig as TRLDPOConfig
            from trl import DPOTrainer

            from training_hub.result import TrainingResult

            tokenizer = _load_tokenizer(config)
            model = _load_model(config)
            args = training_arguments(
                config, TRLDPOConfig, root=root, row_tokens=config.effective_max_length, rows_per_sample=2,
                beta=config.beta, loss_type=[config.loss_type], max_length=None, precompute_ref_log_probs=False,
                **_eval_arguments(config, validation is not None))
            callback = _metrics_callback(root / METRICS_FILE, _resume_step(resume_from))
            bridge = hub_bridge(config, callback.record)  # TrainingHubCallback hooks
            extra, mirror, jit = trl_checkpoints.checkpoint_callbacks(config, root, STATE_DIR)
            trainer = DPOTrainer(model=model, args=args, processing_class=tokenizer,
                                 train_dataset=preference_dataset(train),
                                 eval_dataset=preference_dataset(validation) if validation else None,
                                 callbacks=[callback, bridge, *extra])
            from training_hub.data.preference import preference_length_policy

            trainer.train_dataset, dropped = preference_length_policy(trainer.train_dataset, config, "dpo (trl)")
            if trainer.eval_dataset is not None:
                trainer.eval_dataset, _ = preference_length_policy(trainer.eval_dataset, config, "dpo (trl) validation")
            try:
                path, metrics, last = _train_and_save(trainer, config, root, resume_from, callback)
            except Exception:
                trl_checkpoints.abandon(mirror)
                raise
            bridge.saved(path)
            metrics.update(bridge.ctx.extra)  # stopped_by: a hook's stop
            metrics.update(dropped_or_truncated_samples=dropped, final_reward_margin=last.get("reward_margin"),
                           final_reward_accuracy=last.get("reward_accuracy"))
            result = TrainingResult(status="success", checkpoint_path=str(path) if path else None, metrics=metrics,
                                    output_dir=str(root))
            result = trl_checkpoints.finish(result, mirror, jit)
            bridge.end(result)
            return result


def preference_dataset(pairs: list[dict]):
    """A ``datasets.Dataset`` in TRL's preference format from our validated pairs.

    Our pairs hold strings or message lists per field; TRL wants all three fields of one kind. A string prompt with
    message completions becomes a user message; string completions of a conversational prompt become assistant
    messages.
    """
    from datasets import Dataset

    from training_hub.data.preference import uniform_pair

    return Dataset.from_list([uniform_pair(pair) for pair in pairs])
