"""Parameter groups shared by every algorithm, each declared exactly once.

An algorithm's config is a dataclass that inherits the groups it needs (see ``training_hub.algorithms``).
Names follow the upstream Training Hub where it has one, so user scripts port over unchanged.
Cross-field rules live in each group's ``checks()``; they chain through ``super()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from training_hub.config.declare import DeclaredConfig, closest, ignored, param, translated
from training_hub.storage import storage_url


# What a resumed run may change when the caller lists it in resume_changes (see engine/run.py).
RESUME_CHANGEABLE = ("learning_rate", "lr_scheduler", "lr_scheduler_kwargs", "warmup_steps", "max_steps", "num_epochs")


@dataclass(kw_only=True)
class ModelIOParams(DeclaredConfig):
    group_title = "Model, data and output"

    model_path: str = param(doc="Hugging Face model directory (or hub id already in the local cache) to start from.")
    data_path: str = param(doc="Training data: a .jsonl/.json/.parquet/.csv file, a directory of them, or a saved `datasets` dataset.")
    ckpt_output_dir: str = param(doc="Directory for checkpoints, metrics.jsonl and training state.")
    data_output_dir: Optional[str] = param(None, "Cache directory for processed data (default: <ckpt_output_dir>/data_cache).")
    validation_data_path: Optional[str] = param(None, "Held-out data in the training format; its loss is logged per epoch.")
    validation_split: float = param(0.0, "Fraction of the training data held out for validation when no validation_data_path.", ge=0.0, lt=1.0)
    eval_steps: Optional[int] = param(None, "Also compute the validation loss every N optimizer steps.", gt=0)
    trust_remote_code: bool = param(False, "Allow model code from the model directory (transformers' trust_remote_code).")
    validation_frequency: Optional[int] = param(
        None, "Upstream name of eval_steps (used when eval_steps is not given).", gt=0,
        upstream=translated("eval_steps", lambda c: c.validation_frequency))
    use_processed_dataset: bool = param(
        False, "Upstream: data_path is already tokenized (input_ids/labels). Passed through by the instructlab-training "
               "and mini-trainer backends; native and trl always tokenize themselves (ignored there, with a warning).",
        upstream=ignored("training_hub always validates and tokenizes data_path itself (cached under "
                         "data_output_dir); give the chat or pretraining records, not input_ids/labels"))

    def checks(self) -> list[str]:
        problems = super().checks()
        validation_path = self.validation_data_path or getattr(self, "eval_data_path", None)  # lora_sft's upstream name
        if validation_path and self.validation_split > 0:
            problems.append("validation_split: give either validation_data_path or validation_split, not both")
        if (self.eval_steps or self.validation_frequency) and not (validation_path or self.validation_split > 0):
            problems.append("eval_steps: needs validation data (validation_data_path or validation_split > 0)")
        return problems


@dataclass(kw_only=True)
class LengthParams(DeclaredConfig):
    group_title = "Sequence length"

    max_seq_len: int = param(2048, "Longest sample, in tokens; longer samples are dropped (or truncated, see truncate_long_samples).", gt=0)
    truncate_long_samples: bool = param(False, "Truncate samples longer than max_seq_len instead of dropping them.")


@dataclass(kw_only=True)
class SFTDataParams(DeclaredConfig):
    group_title = "SFT data"

    unmask_messages: bool = param(False, "Put loss on every message except the system prompt, for every sample.")
    is_pretraining: bool = param(False, "Continual pretraining: documents are concatenated and cut into block_size blocks.")
    block_size: Optional[int] = param(None, "Tokens per pretraining block (default: max_seq_len).", gt=0)
    document_column_name: str = param("document", "Field that holds the text of a pretraining document.")


@dataclass(kw_only=True)
class OptimizerParams(DeclaredConfig):
    group_title = "Optimizer (AdamW)"

    learning_rate: float = param(2e-5, "Peak learning rate.", gt=0.0)
    beta1: float = param(0.9, "AdamW beta1.", ge=0.0, lt=1.0)
    beta2: float = param(0.95, "AdamW beta2.", ge=0.0, lt=1.0)
    eps: float = param(1e-8, "AdamW epsilon.", gt=0.0)
    weight_decay: float = param(0.0, "AdamW decoupled weight decay.", ge=0.0)
    max_grad_norm: Optional[float] = param(1.0, "Clip the global gradient norm to this value (None: no clipping).", gt=0.0)
    optimizer_state_dtype: Literal["float32", "bfloat16"] = param(
        "float32", "dtype of AdamW's two moment estimates. bfloat16 halves the optimizer's memory (4 bytes per "
                   "trainable parameter instead of 8: 30 GiB less for an 8B full fine-tune); the update is still "
                   "computed in fp32. Native backends only.")


@dataclass(kw_only=True)
class ScheduleParams(DeclaredConfig):
    group_title = "Schedule"

    num_epochs: int = param(1, "Passes over the training data.", gt=0)
    max_steps: Optional[int] = param(None, "Stop after this many optimizer steps (short runs, smoke tests).", gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = param("cosine", "Learning-rate schedule after warmup.")
    warmup_steps: int = param(0, "Linear warmup from 0 to learning_rate over this many optimizer steps.", ge=0)
    lr_scheduler_kwargs: Optional[dict] = param(None, "Extra schedule options, e.g. {'min_lr_ratio': 0.1} for cosine/linear.")
    seed: int = param(42, "Seed for initialisation-free randomness: data order, dropout, validation split.")


@dataclass(kw_only=True)
class BatchParams(DeclaredConfig):
    group_title = "Batching"

    effective_batch_size: int = param(32, "Samples per optimizer step (across all processes).", gt=0)
    max_tokens_per_gpu: Optional[int] = param(None, "Token budget of one micro-batch per device (default: max_seq_len); "
                                              "larger steps are split and gradients accumulated.", gt=0)

    def checks(self) -> list[str]:
        problems = super().checks()
        max_seq_len = getattr(self, "max_seq_len", None)
        if self.max_tokens_per_gpu and max_seq_len and not getattr(self, "is_pretraining", False):
            if self.max_tokens_per_gpu < max_seq_len:
                problems.append(f"max_tokens_per_gpu: {self.max_tokens_per_gpu} is below max_seq_len {max_seq_len}; "
                                "a sample of max_seq_len tokens could never fit one micro-batch (raise it or lower max_seq_len)")
        return problems


@dataclass(kw_only=True)
class RuntimeParams(DeclaredConfig):
    group_title = "Precision and memory"

    dtype: Literal["auto", "float32", "bfloat16"] = param(
        "auto", "Training precision (fp32 master weights): auto = bf16 autocast on CUDA, and on CPUs with native bf16 "
                "(AMX/AVX512-BF16) for models of hidden size >= 512; fp32 elsewhere (tiny models train faster in fp32). "
                "'bfloat16' on a CPU without native bf16 is emulated by torch, about 8x slower, and warned about.")
    gradient_checkpointing: Optional[bool] = param(
        None, "Recompute activations in the backward pass to save memory (about 8 MB per token at 8B parameters); "
              "None: on with CUDA, off on CPU (where memory is rarely the limit and recomputing costs a third more).")
    torch_compile: bool = param(
        False, "Compile each decoder layer with torch.compile (native engine: sft, osft, lora_sft, dpo), kept only if "
               "it matches eager numerically (else eager, with the reason logged; also under FSDP2). With "
               "gradient_checkpointing each compiled layer is checkpointed as a whole. Compiling takes one to a few "
               "minutes on CPU; it pays off on longer runs (CPU, 110M parameters: 1.5x per step with one thread, "
               "1.05x with two; see docs/benchmarks.md).")
    use_liger: bool = param(
        False, "Use Liger kernels on CUDA (needs liger-kernel): the native engine computes its output loss with Liger's "
               "fused linear cross-entropy, trl turns on its Liger integration. Ignored with a warning without CUDA "
               "or liger-kernel.",
        upstream=ignored("Liger kernels need CUDA and the liger-kernel package (and the native engine uses them only for "
                         "sft, osft and lora_sft); without them it computes the output loss in chunks itself, which "
                         "never holds full-vocabulary logits either"))


@dataclass(kw_only=True)
class CheckpointParams(DeclaredConfig):
    group_title = "Checkpointing"

    save_samples: Optional[int] = param(None, "Save a checkpoint every N training samples (None or 0: off).", ge=0)
    checkpoint_at_epoch: bool = param(False, "Save a checkpoint at the end of every epoch.")
    save_final_checkpoint: bool = param(True, "Save a checkpoint when training ends.")
    resume: bool = param(False, "Continue from the newest complete training state in ckpt_output_dir; every setting "
                                "that decides the training (and the data's content) must be the same as that run's.")
    resume_changes: Optional[list[str]] = param(
        None, "With resume=True: settings allowed to differ from the run being resumed, from learning_rate, "
              "lr_scheduler, lr_scheduler_kwargs, warmup_steps, max_steps, num_epochs. The schedule is rebuilt with "
              "the new values for the new total and continues at the resumed step (warmup is not repeated).")
    keep_last_n_checkpoints: Optional[int] = param(None, "Keep only the newest N intermediate checkpoints (None: keep all).", gt=0)
    keep_last_checkpoint_only: bool = param(
        False, "Upstream: keep only the newest checkpoint (same as keep_last_n_checkpoints=1).",
        upstream=translated("keep_last_n_checkpoints", lambda c: 1 if c.keep_last_checkpoint_only else None))
    enable_jit_checkpoint: bool = param(
        False, "Preemption-safe run: SIGTERM saves the training state at the end of the current step (the native "
               "engine always does), and a restarted run with the same ckpt_output_dir or checkpoint_storage "
               "continues from the newest complete state by itself, as with resume=True.")
    on_demand_checkpointing: bool = param(
        False, "Upstream (SFT/OSFT engines): the same as enable_jit_checkpoint.",
        upstream=translated("enable_jit_checkpoint", lambda c: c.on_demand_checkpointing))
    checkpoint_storage: Optional[str] = param(
        None, "None or 'pvc': checkpoints live in ckpt_output_dir only. A storage URL (s3://bucket/prefix, or any "
              "fsspec protocol): every checkpoint and training state is also mirrored there, each closed by an "
              ".upload_complete marker, and a run whose ckpt_output_dir holds no state resumes from the newest "
              "complete one there (implies enable_jit_checkpoint's resume).")
    accelerate_full_state_at_epoch: bool = param(
        True, "Upstream: save the full training state for resuming (instructlab-training backend). The native engine "
              "always writes it with every checkpoint; False is ignored there, with a warning.",
        upstream=ignored("the native engine always writes the full training state with every checkpoint (resume=True "
                         "needs it)", when=lambda v: v is False))

    def checks(self) -> list[str]:
        problems = super().checks()
        unknown = sorted(set(self.resume_changes or ()) - set(RESUME_CHANGEABLE))
        if unknown:
            problems.append(f"resume_changes: {', '.join(unknown)} cannot change on resume; it may name "
                            f"{', '.join(RESUME_CHANGEABLE)}")
        if self.resume_changes and not self.resume:
            problems.append("resume_changes: only means something with resume=True")
        try:
            storage_url(self.checkpoint_storage)
        except ValueError as exc:
            problems.append(str(exc))
        return problems


@dataclass(kw_only=True)
class LoggingParams(DeclaredConfig):
    group_title = "Logging"

    logging_steps: int = param(1, "Log a progress line every N optimizer steps (metrics.jsonl always gets every step).", gt=0)
    disable_progress_bar: bool = param(False, "Turn off the progress bar on stderr.")
    wandb_project: Optional[str] = param(None, "Weights & Biases project (logging to W&B is off when unset).")
    wandb_entity: Optional[str] = param(None, "Weights & Biases entity.")
    wandb_run_name: Optional[str] = param(None, "Weights & Biases run name.")
    tensorboard_log_dir: Optional[str] = param(None, "Write TensorBoard event files here.")
    mlflow_tracking_uri: Optional[str] = param(None, "MLflow tracking URI (a local file:// store works without a server).")
    mlflow_experiment_name: Optional[str] = param(None, "MLflow experiment name.")
    mlflow_run_name: Optional[str] = param(None, "MLflow run name.")
    callbacks: Optional[list] = param(None, "TrainingHubCallback objects (or one) whose hooks the run calls: train/epoch/"
                                            "step begin and end, log, evaluate, save (upstream-style hooks too).",
                                      cli=False)

    def checks(self) -> list[str]:
        problems = super().checks()
        if self.callbacks:
            from training_hub.callbacks import TrainingHubCallback

            bad = [type(c).__name__ for c in self.callbacks if not isinstance(c, TrainingHubCallback)]
            if bad:
                problems.append(f"callbacks: expected TrainingHubCallback instances, got {', '.join(bad)}")
        return problems


FSDP_OPTION_KEYS = ("cpu_offload_params", "sharding_strategy")


def fsdp_options_dict(value: Any) -> dict[str, Any] | None:
    """``fsdp_options`` as a plain (JSON-able) dict: from a dict, or from an object with those attributes, such as
    upstream's ``instructlab.training.FSDPOptions``. A ``ValueError`` says what is wrong with anything else."""
    if value is None:
        return None
    if isinstance(value, dict):
        items = dict(value)
    elif any(hasattr(value, key) for key in FSDP_OPTION_KEYS):
        items = {key: getattr(value, key) for key in FSDP_OPTION_KEYS if hasattr(value, key)}
    else:
        raise ValueError(f"expected a dict or an FSDPOptions object (with cpu_offload_params), got "
                         f"{type(value).__name__}")
    unknown = sorted(set(items) - set(FSDP_OPTION_KEYS))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))}; known: {', '.join(FSDP_OPTION_KEYS)}")
    if not isinstance(items.get("cpu_offload_params", False), bool):
        raise ValueError(f"cpu_offload_params must be True or False, got {items['cpu_offload_params']!r}")
    strategy = items.get("sharding_strategy")
    if strategy is not None:
        items["sharding_strategy"] = str(getattr(strategy, "value", strategy))  # an enum member -> its name
    return items


def fsdp_cpu_offload(value: Any) -> bool:
    """Whether ``fsdp_options`` asks for FSDP CPU offload (``cpu_offload_params=True``)."""
    return bool((fsdp_options_dict(value) or {}).get("cpu_offload_params"))


@dataclass(kw_only=True)
class DistributedParams(DeclaredConfig):
    group_title = "Distributed (torchrun)"

    nproc_per_node: Union[int, str] = param(
        1, "Processes per node: an int (or its string, e.g. '2', as torchrun takes it), or 'auto' / 'gpu' = one per "
           "GPU, 1 on CPU.")
    nnodes: int = param(1, "Number of nodes.", gt=0)
    node_rank: int = param(0, "Rank of this node.", ge=0)
    rdzv_id: Optional[Union[int, str]] = param(None, "Rendezvous id shared by all nodes of a run.")
    rdzv_endpoint: Optional[str] = param(None, "Rendezvous endpoint host:port.")
    master_addr: Optional[str] = param(None, "Address of the rank-0 node.")
    master_port: Optional[int] = param(None, "Port of the rank-0 node.", gt=0, lt=65536)
    strategy: Literal["auto", "ddp", "fsdp2"] = param(
        "auto", "Data parallel strategy: FSDP2 (fully_shard per decoder layer: parameters, gradients and optimizer "
                "state sharded), DDP (a full copy per process), or auto = FSDP2 on CUDA, as upstream, DDP on CPU.")
    fsdp_options: Optional[Union[dict[str, Any], Any]] = param(
        None, "FSDP options as upstream passes them: a dict, or an FSDPOptions object (instructlab.training's; any "
              "object with cpu_offload_params). cpu_offload_params=True keeps parameters, gradients and optimizer "
              "state in CPU memory under strategy='fsdp2' (native); sharding_strategy is instructlab-training's "
              "(native FSDP2 always shards fully).")

    def checks(self) -> list[str]:
        problems = super().checks()
        nproc = self.nproc_per_node
        if isinstance(nproc, str) and nproc not in ("auto", "gpu") and not nproc.strip().isdigit():
            hint = closest(nproc, ["auto", "gpu"])
            problems.append(f"nproc_per_node: expected a whole number, 'auto' or 'gpu', got {nproc!r}"
                            + (f"; did you mean {hint!r}?" if hint else ""))
        elif not isinstance(nproc, str) or nproc.strip().isdigit():
            if int(nproc) < 1:
                problems.append(f"nproc_per_node: must be >= 1 or 'auto', got {nproc!r}")
        if self.node_rank >= self.nnodes:
            problems.append(f"node_rank: must be < nnodes ({self.nnodes}), got {self.node_rank}")
        try:
            fsdp_options_dict(self.fsdp_options)
        except ValueError as exc:
            problems.append(f"fsdp_options: {exc}")
        return problems
