"""LoRA supervised fine-tuning: SFT that trains low-rank adapters (PEFT) instead of the full weights.

The output is the adapter in PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``); with
``merge=True`` (or ``training-hub merge ADAPTER_DIR OUT_DIR``, see :mod:`training_hub.lora_merge`) also a merged
Hugging Face checkpoint that plain ``transformers`` loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from training_hub.algorithms.base import DeclaredAlgorithm, convenience_function
from training_hub.algorithms.sft import SFTConfig
from training_hub.config.declare import DeclaredConfig, param


@dataclass(kw_only=True)
class LoRAParams(DeclaredConfig):
    group_title = "LoRA"

    lora_r: int = param(16, "Rank of the low-rank update matrices.", gt=0)
    lora_alpha: float = param(32.0, "LoRA scaling numerator: the update is scaled by lora_alpha / lora_r.", gt=0.0)
    lora_dropout: float = param(0.0, "Dropout on the LoRA input during training.", ge=0.0, lt=1.0)
    target_modules: Optional[list[str]] = param(
        None, "Module names to adapt, e.g. ['q_proj', 'v_proj'] or ['all-linear'] (None: PEFT's default for the "
              "architecture).")
    use_dora: bool = param(False, "Weight-decomposed LoRA (DoRA): also learn a magnitude per output feature.")
    load_in_4bit: bool = param(False, "QLoRA: load the frozen base model in 4-bit NF4 (needs CUDA and bitsandbytes).")
    merge: bool = param(False, "After training, also write the base model with the adapter merged in.")

    def checks(self) -> list[str]:
        problems = super().checks()
        if self.target_modules is not None and not self.target_modules:
            problems.append("target_modules: an empty list adapts nothing (use None for PEFT's default)")
        return problems


@dataclass(kw_only=True)
class LoRAUpstreamParams(DeclaredConfig):
    """Names of the upstream ``lora_sft()`` (Unsloth/Axolotl backends) accepted so that scripts port over.

    Each either maps onto one of our parameters or is ignored with one warning (see ``training_hub.compat``).
    """

    group_title = "LoRA: upstream names"

    micro_batch_size: Optional[int] = param(None, "Upstream: samples per device step; with gradient_accumulation_steps "
                                                  "sets effective_batch_size when that is not given.", gt=0)
    gradient_accumulation_steps: Optional[int] = param(None, "Upstream: see micro_batch_size.", gt=0)
    save_steps: Optional[int] = param(None, "Upstream: save every N optimizer steps (becomes save_samples = N x "
                                            "effective_batch_size).", gt=0)
    save_total_limit: Optional[int] = param(None, "Upstream name of keep_last_n_checkpoints.", gt=0)
    bf16: Optional[bool] = param(None, "Upstream: True = dtype 'bfloat16', False = dtype 'float32'.")
    fp16: bool = param(False, "Upstream: float16 training is not supported (ignored, with a warning).")
    tf32: Optional[bool] = param(None, "Upstream: TensorFloat-32 matmuls (CUDA only; ignored, with a warning).")
    flash_attention: Optional[bool] = param(None, "Upstream: attention here is SDPA over packed samples "
                                                  "(True is ignored, with a warning).")
    sample_packing: Optional[bool] = param(None, "Upstream: the native engine always packs samples without "
                                                 "cross-sample attention, which is exact (False is ignored).")
    use_rslora: bool = param(False, "Upstream: rank-stabilised LoRA scaling (ignored, with a warning).")
    init_lora_weights: Optional[Union[bool, str]] = param(None, "Upstream PEFT init option (ignored, with a warning).")
    rank_pattern: Optional[dict] = param(None, "Upstream PEFT per-module ranks (ignored, with a warning).")
    alpha_pattern: Optional[dict] = param(None, "Upstream PEFT per-module alphas (ignored, with a warning).")
    loftq_config: Optional[dict] = param(None, "Upstream LoftQ initialisation (ignored, with a warning).")
    load_in_8bit: bool = param(False, "Upstream 8-bit base model (ignored, with a warning; load_in_4bit is QLoRA).")
    bnb_4bit_quant_type: Optional[str] = param(None, "Upstream QLoRA option; ours is fixed to 'nf4' (another value "
                                                     "is ignored, with a warning).")
    bnb_4bit_compute_dtype: Optional[str] = param(None, "Upstream QLoRA option; ours is fixed to 'bfloat16'.")
    bnb_4bit_use_double_quant: Optional[bool] = param(None, "Upstream QLoRA option; ours is fixed to True.")
    dataset_type: Optional[str] = param(None, "Upstream data format; only 'chat_template' (messages) is read here.")
    field_messages: Optional[str] = param(None, "Upstream: field holding the messages; only 'messages' is read here.")
    field_instruction: Optional[str] = param(None, "Upstream alpaca field (ignored, with a warning).")
    field_input: Optional[str] = param(None, "Upstream alpaca field (ignored, with a warning).")
    field_output: Optional[str] = param(None, "Upstream alpaca field (ignored, with a warning).")
    enable_model_splitting: bool = param(False, "Upstream device_map='balanced' model splitting (ignored, with a "
                                                "warning; use strategy='fsdp2').")
    finetune_vision_layers: Optional[bool] = param(None, "Upstream VLM option (ignored, with a warning).")
    finetune_language_layers: Optional[bool] = param(None, "Upstream VLM option (ignored, with a warning).")
    save_model: Optional[bool] = param(None, "Upstream: False skips saving the model (becomes save_final_checkpoint).")


@dataclass(kw_only=True)
class LoRASFTConfig(LoRAUpstreamParams, LoRAParams, SFTConfig):
    """Every parameter of ``lora_sft()``: all of ``sft()``'s plus the LoRA ones."""


class LoRASFTAlgorithm(DeclaredAlgorithm):
    """Supervised fine-tuning of LoRA adapters."""

    name = "lora_sft"
    config_class = LoRASFTConfig
    backend_preference = ("native", "trl")


def qlora_problems() -> list[str]:
    """Why ``load_in_4bit=True`` cannot run on this machine (empty when it can): for every LoRA backend's checks."""
    import importlib.util

    import torch

    why = []
    if not torch.cuda.is_available():
        why.append("CUDA is not available")
    if importlib.util.find_spec("bitsandbytes") is None:
        why.append("bitsandbytes is not installed (pip install bitsandbytes)")
    if why:
        return [f"load_in_4bit: QLoRA needs CUDA and bitsandbytes, but {' and '.join(why)}; "
                "train without load_in_4bit (plain LoRA) instead"]
    return []


lora_sft = convenience_function(LoRASFTAlgorithm, "Supervised fine-tuning of LoRA adapters (PEFT) on chat data; "
                                "optionally merged into a full checkpoint.")
