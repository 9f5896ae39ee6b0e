"""LoRA supervised fine-tuning: SFT that trains low-rank adapters (PEFT) instead of the full weights.

The output is the adapter in PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``); with
``merge=True`` (or ``training-hub merge ADAPTER_DIR OUT_DIR``, see :mod:`training_hub.lora_merge`) also a merged
Hugging Face checkpoint that plain ``transformers`` loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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
class LoRASFTConfig(LoRAParams, SFTConfig):
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
