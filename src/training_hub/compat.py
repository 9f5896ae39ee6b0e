"""Upstream Training Hub calls, accepted as they are.

Upstream scripts pass names our engine does not use the same way. Every such name is *declared* once (in
``config/groups.py`` or an algorithm's params class) so validation, signatures, CLI and docs know it; this module
holds only what happens to those names after validation, for the built-in algorithms:

* :func:`upstream_call` -- before validation: ``None`` means "the default" (upstream functions default every
  optional parameter to ``None``), ``nproc_per_node='gpu'`` means ``'auto'``, one callback becomes a list.
* :data:`ALIASES` -- upstream names that map onto one of ours (``validation_frequency`` -> ``eval_steps``, ...).
* :data:`IGNORED` -- names that cannot take effect here: each produces exactly one
  :class:`UpstreamParameterWarning` that says why.

The user-facing table is ``docs/upstream-compatibility.md``.
"""

from __future__ import annotations

import dataclasses
import typing
import warnings
from typing import Any, Callable

from training_hub.config.declare import ParameterError, param_specs


class UpstreamParameterWarning(UserWarning):
    """An upstream parameter was accepted but has no effect here; the message says why."""


def _accepts_none(tp: Any) -> bool:
    return tp is Any or tp is type(None) or type(None) in typing.get_args(tp)


def upstream_call(params: dict[str, Any], config_class: type) -> dict[str, Any]:
    """The caller's parameters with upstream conventions resolved (see the module doc)."""
    specs = param_specs(config_class)
    out = {}
    for name, value in params.items():
        spec = specs.get(name)
        if value is None and spec is not None and not spec.required and not _accepts_none(spec.type):
            continue  # upstream: None = use the default
        if name == "nproc_per_node" and value == "gpu":
            value = "auto"
        if name == "callbacks" and value is not None and not isinstance(value, (list, tuple)):
            value = [value]
        out[name] = value
    return out


# ------------------------------------------------------------------------------------------------ aliases


def _world(config) -> int:
    nproc = config.nproc_per_node if isinstance(config.nproc_per_node, int) else 1
    return nproc * config.nnodes


# name -> (target, fold(config) -> value of target). Applied only when the alias was given and the target was not.
ALIASES: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "validation_frequency": ("eval_steps", lambda c: c.validation_frequency),
    "keep_last_checkpoint_only": ("keep_last_n_checkpoints", lambda c: 1 if c.keep_last_checkpoint_only else None),
    "save_total_limit": ("keep_last_n_checkpoints", lambda c: c.save_total_limit),
    "micro_batch_size": ("effective_batch_size",
                         lambda c: c.micro_batch_size * (c.gradient_accumulation_steps or 1) * _world(c)),
    "gradient_accumulation_steps": ("effective_batch_size",
                                    lambda c: (c.micro_batch_size or 1) * c.gradient_accumulation_steps * _world(c)),
    "save_steps": ("save_samples", lambda c: c.save_steps * c.effective_batch_size),
    "bf16": ("dtype", lambda c: "bfloat16" if c.bf16 else "float32"),
    "save_model": ("save_final_checkpoint", lambda c: bool(c.save_model)),
}


# ------------------------------------------------------------------------------------------------ ignored


def _cuda() -> bool:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def _handled(name: str, backend_cls) -> bool:
    """A backend lists in ``upstream_handles`` the upstream names it gives effect to on a CUDA machine (the trl
    backend: ``use_liger``; the instructlab-training and mini-trainer adapters, which run on CUDA only: theirs)."""
    return name in getattr(backend_cls, "upstream_handles", ()) and _cuda()


def _truthy(value, backend_cls) -> bool:
    return bool(value)


def _given(value, backend_cls) -> bool:
    return value is not None


def _not_in(*fine: Any) -> Callable[[Any, type], bool]:
    return lambda value, backend_cls: value is not None and value not in fine


def _false(value, backend_cls) -> bool:
    return value is False


# name -> (is_ignored(value, backend_class), why)
IGNORED: dict[str, tuple[Callable[[Any, type], bool], str]] = {
    "use_liger": (_truthy, "Liger kernels are CUDA-only and used only by the trl, instructlab-training and "
                           "mini-trainer backends on a CUDA machine; the native engine has no Liger integration (it "
                           "already skips full-vocabulary logits for prompt tokens)"),
    "use_processed_dataset": (_truthy, "training_hub always validates and tokenizes data_path itself (cached under "
                                       "data_output_dir); give the chat or pretraining records, not input_ids/labels"),
    "accelerate_full_state_at_epoch": (_false, "the native engine always writes the full training state with every "
                                               "checkpoint (resume=True needs it)"),
    "osft_memory_efficient_init": (_truthy, "the native engine has no separate memory-efficient initialisation mode "
                                            "(the model is loaded once, then its targets are decomposed in place), "
                                            "and mini-trainer 0.9 has no such option"),
    "save_best_val_loss": (_truthy, "best-validation-loss checkpoints are not implemented; use eval_steps with "
                                    "save_samples and pick from metrics.jsonl"),
    "fp16": (_truthy, "float16 training is not supported; use dtype='bfloat16' (or bf16=True)"),
    "tf32": (_given, "TensorFloat-32 is a CUDA matmul setting that training_hub does not change"),
    "flash_attention": (_truthy, "attention is PyTorch SDPA over packed samples (flash kernels where SDPA picks them)"),
    "sample_packing": (_given, "packing is the backend's: native always packs without cross-sample attention "
                               "(exact), trl pads"),
    "use_rslora": (_truthy, "rank-stabilised LoRA scaling is not wired in; the update is scaled by lora_alpha / lora_r"),
    "init_lora_weights": (_given, "LoRA weights use PEFT's default initialisation"),
    "rank_pattern": (_truthy, "per-module LoRA ranks are not supported; lora_r applies to every target"),
    "alpha_pattern": (_truthy, "per-module LoRA alphas are not supported; lora_alpha applies to every target"),
    "loftq_config": (_truthy, "LoftQ initialisation is not supported"),
    "load_in_8bit": (_truthy, "8-bit base models are not supported; load_in_4bit=True is QLoRA"),
    "bnb_4bit_quant_type": (_not_in("nf4"), "QLoRA uses nf4"),
    "bnb_4bit_compute_dtype": (_not_in("bfloat16", "bf16"), "QLoRA computes in bfloat16"),
    "bnb_4bit_use_double_quant": (_false, "QLoRA uses double quantization"),
    "dataset_type": (_not_in("chat_template"), "data is read as chat messages (or pretraining documents) only"),
    "field_messages": (_not_in("messages"), "the messages are read from the 'messages' field"),
    "field_instruction": (_given, "alpaca-format data is not read; convert it to messages"),
    "field_input": (_given, "alpaca-format data is not read; convert it to messages"),
    "field_output": (_given, "alpaca-format data is not read; convert it to messages"),
    "enable_model_splitting": (_truthy, "device_map model splitting is not supported; use strategy='fsdp2'"),
    "finetune_vision_layers": (_given, "vision-language models are not supported"),
    "finetune_language_layers": (_given, "vision-language models are not supported"),
}


def apply(config, given: dict[str, Any], backend_cls: type, *, what: str) -> tuple[Any, list[str]]:
    """Fold aliases into ``config`` and warn once per ignored name; return (config, names to pass on).

    Names to pass on: those the caller gave plus each alias's target, so a backend that rebuilds the config from
    the plain dict sees the folded values.
    """
    fields = {f.name for f in dataclasses.fields(config)}
    names = list(given)
    updates: dict[str, Any] = {}
    for alias, (target, fold) in ALIASES.items():
        if alias in given and alias in fields and target not in given and target not in updates:
            value = fold(config)
            if value is not None:  # one at a time: save_steps reads the effective_batch_size folded before it
                updates[target] = value
                config = dataclasses.replace(config, **{target: value})
    if updates:
        problems = config.checks()
        if problems:
            raise ParameterError(what, problems)
        names += [n for n in updates if n not in names]
    for name in given:
        rule = IGNORED.get(name)
        if (rule and name in fields and rule[0](getattr(config, name), backend_cls)
                and not _handled(name, backend_cls)):
            warnings.warn(f"{name}={getattr(config, name)!r} is ignored: {rule[1]}.", UpstreamParameterWarning,
                          stacklevel=4)
    return config, names
