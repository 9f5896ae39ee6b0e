"""The config of every built-in algorithm: the shared groups (``groups.py``) plus each algorithm's own.

They live here, below the backends and the algorithms, because both use them: an algorithm validates a call into
its config once, and a built-in backend receives that typed config. The bases are written out (not computed) so
that type checkers see every field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from training_hub.config.declare import DeclaredConfig, ignored, param, translated
from training_hub.config.groups import (
    BatchParams, CheckpointParams, DistributedParams, LengthParams, LoggingParams, ModelIOParams, OptimizerParams,
    RuntimeParams, ScheduleParams, SFTDataParams,
)
from training_hub.config.processes import process_count

# ------------------------------------------------------------------------------------------------ sft


@dataclass(kw_only=True)
class SFTConfig(DistributedParams, LoggingParams, CheckpointParams, RuntimeParams, BatchParams, ScheduleParams,
                OptimizerParams, SFTDataParams, LengthParams, ModelIOParams):
    """Every parameter of ``sft()``; the engine groups are shared with the other algorithms."""

    algorithm_name = "sft"  # what callbacks and loggers call the run (ctx.algorithm)


# ------------------------------------------------------------------------------------------------ osft


@dataclass(kw_only=True)
class OSFTParams(DeclaredConfig):
    group_title = "OSFT"

    unfreeze_rank_ratio: float = param(doc="Fraction of each target's singular directions that train (0 < r <= 1); "
                                           "the top floor(min(out, in) * (1 - r)) stay frozen.", gt=0.0, le=1.0)
    target_patterns: Optional[list[str]] = param(
        None, "Linear layers to decompose, e.g. ['self_attn.q_proj', 'mlp.down_proj'] (default: the attention and "
              "MLP projections of the model's architecture).")
    freeze_non_targets: bool = param(
        False, "Also freeze every non-target parameter (embeddings, norms, biases); default: they train as in SFT.")
    osft_memory_efficient_init: bool = param(
        False, "Upstream option for loading very large models; neither the native engine nor mini-trainer 0.9 has "
               "such a mode (ignored, with a warning).",
        upstream=ignored("the native engine has no separate memory-efficient initialisation mode (the model is "
                         "loaded once, then its targets are decomposed in place), and mini-trainer 0.9 has no such "
                         "option"))
    save_best_val_loss: bool = param(
        False, "Upstream mini-trainer option: also save when the validation loss improves (mini-trainer backend; "
               "ignored by native, with a warning: use eval_steps with save_samples instead).",
        upstream=ignored("best-validation-loss checkpoints are not implemented; use eval_steps with save_samples "
                         "and pick from metrics.jsonl"))


@dataclass(kw_only=True)
class OSFTConfig(OSFTParams, DistributedParams, LoggingParams, CheckpointParams, RuntimeParams, BatchParams,
                 ScheduleParams, OptimizerParams, SFTDataParams, LengthParams, ModelIOParams):
    """Every parameter of ``osft()``: all of ``sft()``'s (engine, data, checkpoints) plus the OSFT ones."""

    algorithm_name = "osft"


# ------------------------------------------------------------------------------------------------ lora_sft


@dataclass(kw_only=True)
class LoRAParams(DeclaredConfig):
    group_title = "LoRA"

    lora_r: int = param(16, "Rank of the low-rank update matrices.", gt=0)
    lora_alpha: float = param(32.0, "LoRA scaling numerator: the update is scaled by lora_alpha / lora_r.", gt=0.0)
    lora_dropout: float = param(0.0, "Dropout on the LoRA input during training.", ge=0.0, lt=1.0)
    target_modules: Optional[list[str]] = param(
        None, "Module names to adapt, e.g. ['q_proj', 'v_proj'] (None: every linear projection except the output "
              "layer, PEFT's 'all-linear', as upstream's default).")
    use_dora: bool = param(False, "Weight-decomposed LoRA (DoRA): also learn a magnitude per output feature.")
    load_in_4bit: bool = param(False, "QLoRA: load the frozen base model in 4-bit NF4 (needs CUDA and bitsandbytes).")
    merge: bool = param(False, "After training, also write the base model with the adapter merged in.")

    def checks(self) -> list[str]:
        problems = super().checks()
        if self.target_modules is not None and not self.target_modules:
            problems.append("target_modules: an empty list adapts nothing (use None for every linear projection)")
        return problems


def _given(value) -> bool:
    return value is not None


def _not_in(*fine):
    return lambda value: value is not None and value not in fine


_ALPACA = "alpaca-format data is not read; convert it to messages"


def _per_step_samples(c) -> int:
    """upstream micro_batch_size x gradient_accumulation_steps x processes = our effective_batch_size."""
    return (c.micro_batch_size or 1) * (c.gradient_accumulation_steps or 1) * process_count(c)


@dataclass(kw_only=True)
class LoRAUpstreamParams(DeclaredConfig):
    """Names of the upstream ``lora_sft()`` (Unsloth/Axolotl backends) accepted so that scripts port over; each
    either sets one of our parameters or is ignored with one warning (see ``training_hub.config.upstream``)."""

    micro_batch_size: Optional[int] = param(
        None, "Upstream: samples per device step; with gradient_accumulation_steps sets effective_batch_size when "
              "that is not given.", gt=0, upstream=translated("effective_batch_size", _per_step_samples))
    gradient_accumulation_steps: Optional[int] = param(
        None, "Upstream: see micro_batch_size.", gt=0, upstream=translated("effective_batch_size", _per_step_samples))
    save_steps: Optional[int] = param(
        None, "Upstream: save every N optimizer steps (becomes save_samples = N x effective_batch_size).", gt=0,
        upstream=translated("save_samples", lambda c: c.save_steps * c.effective_batch_size))
    save_total_limit: Optional[int] = param(
        None, "Upstream name of keep_last_n_checkpoints.", gt=0,
        upstream=translated("keep_last_n_checkpoints", lambda c: c.save_total_limit))
    bf16: Optional[bool] = param(None, "Upstream: True = dtype 'bfloat16', False = dtype 'float32'.",
                                 upstream=translated("dtype", lambda c: "bfloat16" if c.bf16 else "float32"))
    fp16: bool = param(False, "Upstream: float16 training is not supported (ignored, with a warning).",
                       upstream=ignored("float16 training is not supported; use dtype='bfloat16' (or bf16=True)"))
    tf32: Optional[bool] = param(
        None, "Upstream: TensorFloat-32 matmuls (CUDA only; ignored, with a warning).",
        upstream=ignored("the native engine always allows TensorFloat-32 for the CUDA matmuls that stay in fp32 (OSFT's "
                         "parameter projection excepted, which runs in full fp32)", _given))
    flash_attention: Optional[bool] = param(
        None, "Upstream: the native engine chooses its packed attention itself (True is ignored, with a warning).",
        upstream=ignored("the native engine chooses packed attention itself: on CUDA a varlen flash kernel (flash-attn, "
                         "else torch's varlen_attn) when it passes a numeric self-check, else SDPA per sample"))
    sample_packing: Optional[bool] = param(
        None, "Upstream: the native engine always packs samples without cross-sample attention, which is exact "
              "(False is ignored).",
        upstream=ignored("packing is the backend's: native always packs without cross-sample attention (exact), "
                         "trl pads", _given))
    use_rslora: bool = param(False, "Upstream: rank-stabilised LoRA scaling (ignored, with a warning).",
                             upstream=ignored("rank-stabilised LoRA scaling is not wired in; the update is scaled by "
                                              "lora_alpha / lora_r"))
    init_lora_weights: Optional[Union[bool, str]] = param(
        None, "Upstream PEFT init option (ignored, with a warning).",
        upstream=ignored("LoRA weights use PEFT's default initialisation", _given))
    rank_pattern: Optional[dict] = param(
        None, "Upstream PEFT per-module ranks (ignored, with a warning).",
        upstream=ignored("per-module LoRA ranks are not supported; lora_r applies to every target"))
    alpha_pattern: Optional[dict] = param(
        None, "Upstream PEFT per-module alphas (ignored, with a warning).",
        upstream=ignored("per-module LoRA alphas are not supported; lora_alpha applies to every target"))
    loftq_config: Optional[dict] = param(None, "Upstream LoftQ initialisation (ignored, with a warning).",
                                         upstream=ignored("LoftQ initialisation is not supported"))
    load_in_8bit: bool = param(
        False, "Upstream 8-bit base model (ignored, with a warning; load_in_4bit is QLoRA).",
        upstream=ignored("8-bit base models are not supported; load_in_4bit=True is QLoRA"))
    bnb_4bit_quant_type: Optional[str] = param(
        None, "Upstream QLoRA option; ours is fixed to 'nf4' (another value is ignored, with a warning).",
        upstream=ignored("QLoRA uses nf4", _not_in("nf4")))
    bnb_4bit_compute_dtype: Optional[str] = param(
        None, "Upstream QLoRA option; ours is fixed to 'bfloat16'.",
        upstream=ignored("QLoRA computes in bfloat16", _not_in("bfloat16", "bf16")))
    bnb_4bit_use_double_quant: Optional[bool] = param(
        None, "Upstream QLoRA option; ours is fixed to True.",
        upstream=ignored("QLoRA uses double quantization", lambda v: v is False))
    dataset_type: Optional[str] = param(
        None, "Upstream data format; only 'chat_template' (messages) is read here.",
        upstream=ignored("data is read as chat messages (or pretraining documents) only", _not_in("chat_template")))
    field_messages: Optional[str] = param(
        None, "Upstream: field holding the messages; only 'messages' is read here.",
        upstream=ignored("the messages are read from the 'messages' field", _not_in("messages")))
    field_instruction: Optional[str] = param(None, "Upstream alpaca field (ignored, with a warning).",
                                             upstream=ignored(_ALPACA, _given))
    field_input: Optional[str] = param(None, "Upstream alpaca field (ignored, with a warning).",
                                       upstream=ignored(_ALPACA, _given))
    field_output: Optional[str] = param(None, "Upstream alpaca field (ignored, with a warning).",
                                        upstream=ignored(_ALPACA, _given))
    enable_model_splitting: bool = param(
        False, "Upstream device_map='balanced' model splitting (ignored, with a warning; use strategy='fsdp2').",
        upstream=ignored("device_map model splitting is not supported; use strategy='fsdp2'"))
    finetune_vision_layers: Optional[bool] = param(
        None, "Upstream VLM option (ignored, with a warning).",
        upstream=ignored("vision-language models are not supported", _given))
    finetune_language_layers: Optional[bool] = param(
        None, "Upstream VLM option (ignored, with a warning).",
        upstream=ignored("vision-language models are not supported", _given))
    save_model: Optional[bool] = param(
        None, "Upstream: False skips saving the model (becomes save_final_checkpoint).",
        upstream=translated("save_final_checkpoint", lambda c: bool(c.save_model)))
    eval_data_path: Optional[str] = param(
        None, "Upstream name of validation_data_path (used when validation_data_path is not given).",
        upstream=translated("validation_data_path", lambda c: c.eval_data_path))
    per_device_eval_batch_size: Optional[int] = param(
        None, "Upstream: samples per device in an evaluation batch (ignored, with a warning: validation batches are "
              "cut by max_tokens_per_gpu, as training micro-batches are).", gt=0,
        upstream=ignored("validation batches are cut by max_tokens_per_gpu like the training micro-batches (an "
                         "evaluation batch size changes memory and speed, not what is evaluated)", _given))


@dataclass(kw_only=True)
class LoRASFTConfig(LoRAUpstreamParams, LoRAParams, SFTConfig):
    """Every parameter of ``lora_sft()``: all of ``sft()``'s plus the LoRA ones."""

    algorithm_name = "lora_sft"


# ------------------------------------------------------------------------------------------------ dpo

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")


@dataclass(kw_only=True)
class DPOParams(DeclaredConfig):
    group_title = "DPO"

    beta: float = param(0.1, "Strength of the pull towards the reference model (the beta of the DPO loss; "
                             "for ipo, its regularisation tau).", gt=0.0)
    loss_type: Literal["sigmoid", "hinge", "ipo"] = param(
        "sigmoid", "Preference loss: sigmoid (the DPO paper), hinge (SLiC) or ipo (IPO, length-normalised).")
    max_length: Optional[int] = param(
        None, "Longest prompt+completion, in tokens (default: max_seq_len); see truncate_long_samples.", gt=0)
    max_prompt_length: Optional[int] = param(
        None, "Keep at most the last N prompt tokens of each pair (None: keep the whole prompt).", gt=0)


@dataclass(kw_only=True)
class DPOConfig(DPOParams, DistributedParams, LoggingParams, CheckpointParams, RuntimeParams, BatchParams,
                ScheduleParams, OptimizerParams, LengthParams, ModelIOParams):
    """Every parameter of ``dpo()``: the engine groups shared with the other algorithms plus the DPO ones."""

    algorithm_name = "dpo"

    def checks(self) -> list[str]:
        problems = super().checks()
        length = self.effective_max_length
        if self.max_prompt_length is not None and self.max_prompt_length >= length:
            problems.append(f"max_prompt_length: {self.max_prompt_length} leaves no room for the completion "
                            f"within max_length {length}")
        return problems

    @property
    def effective_max_length(self) -> int:
        """``max_length`` if given, else ``max_seq_len``."""
        return self.max_length if self.max_length is not None else self.max_seq_len
