"""The ``instructlab-training`` backend of ``sft``: InstructLab's training library runs the training.

Install with ``pip install 'training-hub[instructlab]'``; it trains on CUDA GPUs only (FSDP, flash attention), so
``is_available()`` is False elsewhere and the default backend falls to ``native``. Where it can run it is the
default of ``sft()``, as in the upstream Training Hub.

What stays ours (see :mod:`training_hub.backends.engine_adapter`): parameter validation and defaults, data
validation and tokenization (handed over as tokenized JSONL with ``process_data=False``), metrics.jsonl, the
shared loggers and ``TrainingHubCallback`` hooks. :func:`instructlab_training_args` is the whole translation.

How our parameters map (``TrainingArgs`` field in brackets):

* ``max_tokens_per_gpu`` [max_batch_len] (default ``max_seq_len``), ``seed`` [random_seed], ``beta1``/``beta2``
  [adamw_betas], ``eps`` [adamw_eps], ``weight_decay`` [adamw_weight_decay], ``save_samples`` [save_samples],
  ``eval_steps`` [validation_frequency], ``keep_last_n_checkpoints=1`` [keep_last_checkpoint_only];
  the distributed group -> ``TorchrunArgs``; ``strategy='fsdp2'`` -> FSDP ``FULL_SHARD`` (not given: the
  library's default sharding).
* instructlab-training saves its last checkpoint through its per-epoch save, so ``save_final_checkpoint=True``
  turns ``checkpoint_at_epoch`` on (with several epochs every epoch is then saved).
* Continual pretraining: our pipeline cuts the documents into ``block_size`` blocks, and the blocks are handed
  over as samples with loss on every token. With ``use_processed_dataset=True`` the tokenized documents go to the
  library's own block sampler (``PretrainingConfig``).
* Refused, when given with another value, because the library has no such setting: ``lr_scheduler`` other than
  cosine, ``lr_scheduler_kwargs``, ``max_grad_norm`` other than 1.0, ``dtype='float32'``, ``max_steps``,
  ``resume``, ``keep_last_n_checkpoints`` > 1, ``strategy='ddp'``, ``gradient_checkpointing=False``,
  ``validation_data_path``, ``validation_split`` without ``eval_steps``; ``enable_jit_checkpoint`` and a
  ``checkpoint_storage`` URL (their automatic resume and mirroring are the native and trl backends').
* ``fsdp_options`` (a dict or ``FSDPOptions``) [fsdp_options], over the sharding ``strategy`` gives.
* Other ``TrainingArgs`` fields (e.g. ``disable_flash_attn``, ``deepspeed_options``) are engine options: accepted
  with this backend only, passed through as given (see ``passthrough_params``).
"""

from __future__ import annotations

from typing import Any, Dict

from training_hub.backends.engine_adapter import EngineAdapter, EngineData, Rules, torchrun_fields
from training_hub.backends.engine_events import TrainingHubEvents
from training_hub.config.algorithms import SFTConfig
from training_hub.config.groups import fsdp_options_dict

NAME = "instructlab-training"

# TrainingArgs fields the adapter owns: paths, data handling (our pipeline tokenizes, so the library's chat template
# and processing options would have no effect) and callbacks. Other fields not declared by us pass through as given.
NOT_PASSED = frozenset({"model_path", "data_path", "ckpt_output_dir", "data_output_dir", "process_data", "callbacks",
                        "pretraining_config", "chat_tmpl_path", "use_legacy_tmpl", "data_process_num_cpu_procs"})

RULES: Rules = {
    "lr_scheduler": (lambda v, c: v == "cosine", "instructlab-training always uses a cosine schedule"),
    "lr_scheduler_kwargs": (lambda v, c: not v, "instructlab-training takes no schedule options"),
    "max_grad_norm": (lambda v, c: v == 1.0, "instructlab-training clips the gradient norm at 1.0"),
    "dtype": (lambda v, c: v in ("auto", "bfloat16"), "instructlab-training trains in bfloat16 mixed precision"),
    "max_steps": (lambda v, c: v is None, "instructlab-training stops at the end of num_epochs only"),
    "resume": (lambda v, c: not v, "resuming a run is not wired into the instructlab-training adapter"),
    "enable_jit_checkpoint": (lambda v, c: not v, f"a restarted run resuming by itself is not wired into the {NAME} "
                                                  "adapter; backend='native' saves on SIGTERM and resumes"),
    "checkpoint_storage": (lambda v, c: v in (None, "", "pvc"), f"mirroring checkpoints to a storage URL is not "
                                                                f"wired into the {NAME} adapter; use backend='native'"),
    "keep_last_n_checkpoints": (lambda v, c: v in (None, 1),
                                "instructlab-training keeps every checkpoint or only the last one (1)"),
    "strategy": (lambda v, c: v in ("auto", "fsdp2"), "instructlab-training shards the model with FSDP (strategy='fsdp2')"),
    "gradient_checkpointing": (lambda v, c: bool(v), "instructlab-training always recomputes activations"),
    "validation_data_path": (lambda v, c: v is None, "instructlab-training validates on a split of the "
                                                     "training data only (validation_split with eval_steps)"),
    "validation_split": (lambda v, c: v == 0 or c.eval_steps is not None,
                         "instructlab-training needs eval_steps (or validation_frequency) with a validation split"),
}


def instructlab_training_args(config, data: EngineData, given: frozenset[str] | set[str] = frozenset(),
                              options: Dict[str, Any] | None = None):
    """Our validated ``SFTConfig`` (with the prepared data) as ``(TrainingArgs, TorchrunArgs)`` of
    ``instructlab.training``. ``given`` is the set of parameter names the caller passed (unrequested settings are
    left at the library's defaults where ours has no counterpart); ``options`` are TrainingArgs fields the caller
    passed through (they win over the translation)."""
    from instructlab.training import (
        DistributedBackend, FSDPOptions, PretrainingConfig, ShardingStrategies, TorchrunArgs, TrainingArgs,
    )

    fields: Dict[str, Any] = dict(
        model_path=config.model_path,
        data_path=data.train_path,
        data_output_dir=data.directory,  # the library reads <data_output_dir>/data.jsonl
        process_data=False,
        ckpt_output_dir=config.ckpt_output_dir,
        max_seq_len=config.max_seq_len,
        max_batch_len=config.max_tokens_per_gpu or config.max_seq_len,
        num_epochs=config.num_epochs,
        effective_batch_size=config.effective_batch_size,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        adamw_betas=(config.beta1, config.beta2),
        adamw_eps=config.eps,
        adamw_weight_decay=config.weight_decay,
        random_seed=config.seed,
        save_samples=config.save_samples or 0,
        checkpoint_at_epoch=config.checkpoint_at_epoch or config.save_final_checkpoint,
        accelerate_full_state_at_epoch=config.accelerate_full_state_at_epoch,
        keep_last_checkpoint_only=config.keep_last_n_checkpoints == 1,
        use_liger=config.use_liger,
        trust_remote_code=config.trust_remote_code,
        validation_split=config.validation_split,
        validation_frequency=config.eval_steps if config.validation_split > 0 else None,
        distributed_backend=DistributedBackend.FSDP,
        callbacks=[TrainingHubEvents()],
    )
    fsdp: Dict[str, Any] = ({"sharding_strategy": ShardingStrategies.FULL_SHARD}
                            if "strategy" in given and config.strategy == "fsdp2" else {})
    if isinstance(config.fsdp_options, FSDPOptions):  # the engine's own object, as upstream scripts pass it
        fields["fsdp_options"] = config.fsdp_options
    else:
        fsdp.update({k: v for k, v in (fsdp_options_dict(config.fsdp_options) or {}).items() if v is not None})
        if fsdp:
            fields["fsdp_options"] = FSDPOptions(**fsdp)
    if config.is_pretraining and data.pretokenized:
        fields["pretraining_config"] = PretrainingConfig(block_size=config.block_size or config.max_seq_len,
                                                         document_column_name=config.document_column_name)
    fields.update(options or {})
    return TrainingArgs(**fields), TorchrunArgs(**torchrun_fields(config))


class InstructLabTrainingSFTBackend(EngineAdapter):
    """SFT through ``instructlab.training.run_training`` (CUDA only)."""

    name, algorithm = NAME, "sft"
    package, distribution, extra, args_file = "instructlab.training", "instructlab-training", "instructlab", "config.py"
    rules, not_passed = RULES, NOT_PASSED
    upstream_handles = ("use_liger", "use_processed_dataset", "accelerate_full_state_at_epoch")  # training_hub.config.upstream

    @classmethod
    def config_class(cls) -> type:
        return SFTConfig

    @classmethod
    def translate(cls, config, data: EngineData, given: set[str], options: Dict[str, Any]):
        return instructlab_training_args(config, data, given, options)

    @classmethod
    def run_engine(cls, torch_args, train_args) -> None:
        from instructlab.training import run_training

        run_training(torch_args=torch_args, train_args=train_args)
