"""The ``mini-trainer`` backends of ``osft`` (and of ``sft``): Red Hat AI Innovation's mini-trainer trains.

Install with ``pip install 'training-hub[mini-trainer]'`` (package ``rhai-innovation-mini-trainer``); it trains on
CUDA GPUs only (FSDP2), so ``is_available()`` is False elsewhere and the default backend falls to ``native``.
Where it can run it is the default of ``osft()``, as in the upstream Training Hub.

What stays ours (see :mod:`training_hub.backends.engine_adapter`): parameter validation and defaults, data
validation and tokenization (mini-trainer does none of its own; upstream borrows instructlab-training's, we use
ours, so this backend does not need instructlab-training installed), metrics.jsonl, the shared loggers and
``TrainingHubCallback`` hooks. :func:`mini_trainer_args` is the whole translation.

How our parameters map (``TrainingArgs`` field in brackets):

* ``model_path`` [model_name_or_path], ``ckpt_output_dir`` [output_dir], ``effective_batch_size`` [batch_size],
  ``warmup_steps`` [num_warmup_steps], ``num_epochs`` [max_epochs], ``max_steps`` [training_mode=STEP, max_steps],
  ``save_samples`` [min_samples_per_checkpoint], ``eval_steps`` [validation_frequency], ``use_liger``
  [use_liger_kernels], ``unfreeze_rank_ratio`` [osft_unfreeze_rank_ratio], ``target_patterns``
  [osft_target_patterns]; ``osft=True`` (``MiniTrainerSFTBackend``, sft on mini-trainer as upstream offers it:
  ``osft=False``); validation data (a split or ``validation_data_path``) is also evaluated
  at every epoch end [validate_at_epoch], as in the native engine.
* Schedules go to ``transformers.get_scheduler``: ``constant`` becomes ``constant_with_warmup`` when there is a
  warmup, cosine with ``lr_scheduler_kwargs={'min_lr_ratio': r}`` becomes ``cosine_with_min_lr``.
* Refused, when given with another value: ``max_grad_norm`` other than 1.0 (mini-trainer clips at 1.0),
  ``dtype='bfloat16'`` (mini-trainer's bfloat16 mode keeps the weights themselves in bfloat16, with no float32
  master copy), ``strategy='ddp'`` (it always shards with FSDP2), ``resume``, ``keep_last_n_checkpoints``,
  ``freeze_non_targets``, ``gradient_checkpointing``, ``lr_scheduler_kwargs`` other than ``min_lr_ratio`` with
  cosine, ``enable_jit_checkpoint`` and a ``checkpoint_storage`` URL (the native backend's).
* Other ``TrainingArgs`` fields (e.g. ``osft_upcast_dtype``, ``save_dtype``, ``training_mode``) are engine
  options: accepted with this backend only, passed through as given (see ``passthrough_params``).
"""

from __future__ import annotations

from typing import Any, Dict

from training_hub.backends.engine_adapter import EngineAdapter, EngineData, Rules, torchrun_fields
from training_hub.backends.engine_events import TrainingHubEvents
from training_hub.config.algorithms import OSFTConfig, SFTConfig
from training_hub.config.groups import fsdp_cpu_offload

NAME = "mini-trainer"


# TrainingArgs fields the adapter owns (paths, the OSFT switch, callbacks); other fields not declared by us (e.g.
# osft_upcast_dtype, save_dtype, train_dtype, training_mode, max_tokens) pass through as given.
NOT_PASSED = frozenset({"model_name_or_path", "data_path", "output_dir", "osft", "callbacks", "pretraining_config"})


def _schedule_kwargs_fine(value, config) -> bool:
    return not value or (set(value) == {"min_lr_ratio"} and config.lr_scheduler == "cosine")


RULES: Rules = {
    "max_grad_norm": (lambda v, c: v == 1.0, "mini-trainer clips the gradient norm at 1.0"),
    "dtype": (lambda v, c: v in ("auto", "float32"),
              "mini-trainer's bfloat16 mode keeps the weights themselves in bfloat16 (no float32 master copy); "
              "leave dtype out for its float32 weights with mixed-precision compute"),
    "strategy": (lambda v, c: v in ("auto", "fsdp2"), "mini-trainer always shards the model with FSDP2"),
    "fsdp_options": (lambda v, c: not fsdp_cpu_offload(v), "mini-trainer has no CPU offload setting"),
    "resume": (lambda v, c: not v, "resuming a run is not wired into the mini-trainer adapter"),
    "enable_jit_checkpoint": (lambda v, c: not v, f"a restarted run resuming by itself is not wired into the {NAME} "
                                                  "adapter; backend='native' saves on SIGTERM and resumes"),
    "checkpoint_storage": (lambda v, c: v in (None, "", "pvc"), f"mirroring checkpoints to a storage URL is not "
                                                                f"wired into the {NAME} adapter; use backend='native'"),
    "keep_last_n_checkpoints": (lambda v, c: v is None, "mini-trainer keeps every checkpoint"),
    "freeze_non_targets": (lambda v, c: not v, "mini-trainer trains every non-target parameter"),
    "gradient_checkpointing": (lambda v, c: not v, "mini-trainer has no activation recomputation option"),
    "save_best_val_loss": (lambda v, c: not v or c.validation_split > 0 or c.validation_data_path is not None,
                           "saving on a better validation loss needs validation data (validation_split or "
                           "validation_data_path)"),
    "lr_scheduler_kwargs": (_schedule_kwargs_fine, "mini-trainer takes {'min_lr_ratio': r} with the cosine "
                                                   "schedule only"),
}


def _schedule(config) -> tuple[str, dict]:
    kwargs = config.lr_scheduler_kwargs or {}
    if config.lr_scheduler == "cosine" and "min_lr_ratio" in kwargs:
        return "cosine_with_min_lr", {"min_lr_rate": float(kwargs["min_lr_ratio"])}
    if config.lr_scheduler == "constant" and config.warmup_steps:
        return "constant_with_warmup", {}
    return config.lr_scheduler, {}


def mini_trainer_args(config, data: EngineData, options: Dict[str, Any] | None = None):
    """Our validated ``OSFTConfig`` (``osft=True``) or ``SFTConfig`` (``osft=False``), with the prepared data, as
    ``(TrainingArgs, TorchrunArgs)`` of ``mini_trainer``; ``options`` are TrainingArgs fields the caller passed
    through (they win)."""
    from mini_trainer import PretrainingConfig, TorchrunArgs, TrainingArgs, TrainingMode


    scheduler, scheduler_kwargs = _schedule(config)
    has_validation = config.validation_split > 0 or data.validation_path is not None
    fields: Dict[str, Any] = dict(
        model_name_or_path=config.model_path,
        data_path=data.train_path,
        output_dir=config.ckpt_output_dir,
        batch_size=config.effective_batch_size,
        max_tokens_per_gpu=config.max_tokens_per_gpu or config.max_seq_len,
        learning_rate=config.learning_rate,
        num_warmup_steps=config.warmup_steps,
        lr_scheduler=scheduler,
        lr_scheduler_kwargs=scheduler_kwargs,
        seed=config.seed,
        beta1=config.beta1,
        beta2=config.beta2,
        eps=config.eps,
        weight_decay=config.weight_decay,
        use_liger_kernels=config.use_liger,
        min_samples_per_checkpoint=config.save_samples or None,
        training_mode=TrainingMode.STEP if config.max_steps else TrainingMode.EPOCH,
        max_epochs=config.num_epochs,
        max_steps=config.max_steps or 0,
        checkpoint_at_epoch=config.checkpoint_at_epoch,
        save_final_checkpoint=config.save_final_checkpoint,
        validation_split=config.validation_split if data.validation_path is None else 0.0,
        validation_data_path=data.validation_path,
        validation_frequency=config.eval_steps if has_validation else None,
        validate_at_epoch=has_validation,
        save_best_val_loss=getattr(config, "save_best_val_loss", False),
        trust_remote_code=config.trust_remote_code,
        callbacks=[TrainingHubEvents()],
    )
    osft = hasattr(config, "unfreeze_rank_ratio")  # an OSFTConfig; an SFTConfig trains every weight
    fields["osft"] = osft
    if osft:
        fields.update(osft_unfreeze_rank_ratio=config.unfreeze_rank_ratio, osft_target_patterns=config.target_patterns)
    if config.dtype == "float32":
        fields["train_dtype"] = "float32"
    if config.is_pretraining and data.pretokenized:
        fields["pretraining_config"] = PretrainingConfig(block_size=config.block_size or config.max_seq_len)
    fields.update(options or {})
    if isinstance(fields["training_mode"], str):  # mini-trainer's launcher reads training_mode.value
        fields["training_mode"] = TrainingMode(fields["training_mode"])
    return TrainingArgs(**fields), TorchrunArgs(**torchrun_fields(config))


class _MiniTrainerBackend(EngineAdapter):
    """Shared by the osft and sft backends on mini-trainer (CUDA only)."""

    name = NAME
    package, distribution, extra, args_file = ("mini_trainer", "rhai-innovation-mini-trainer", "mini-trainer",
                                               "training_types.py")
    rules, not_passed = RULES, NOT_PASSED
    upstream_handles = ("use_liger", "use_processed_dataset", "save_best_val_loss")  # see training_hub.config.upstream

    @classmethod
    def translate(cls, config, data: EngineData, given: set[str], options: Dict[str, Any]):
        return mini_trainer_args(config, data, options)

    @classmethod
    def run_engine(cls, torch_args, train_args) -> None:
        from mini_trainer import run_training

        run_training(torch_args=torch_args, train_args=train_args)


class MiniTrainerOSFTBackend(_MiniTrainerBackend):
    """OSFT through ``mini_trainer.run_training`` (CUDA only); the default of ``osft()`` where it can run."""

    algorithm = "osft"

    @classmethod
    def config_class(cls) -> type:
        return OSFTConfig


class MiniTrainerSFTBackend(_MiniTrainerBackend):
    """Plain SFT through ``mini_trainer.run_training`` with ``osft=False`` (CUDA only), as upstream offers it;
    used when named (``sft(..., backend="mini-trainer")``) or when a call passes one of mini-trainer's options."""

    algorithm = "sft"
    not_passed = NOT_PASSED | {"osft_unfreeze_rank_ratio", "osft_target_patterns", "osft_upcast_dtype"}

    @classmethod
    def config_class(cls) -> type:
        return SFTConfig
