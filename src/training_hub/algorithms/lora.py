"""LoRA supervised fine-tuning: SFT that trains low-rank adapters (PEFT) instead of the full weights.

The output is the adapter in PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``); with
``merge=True`` (or ``training-hub merge ADAPTER_DIR OUT_DIR``, see :mod:`training_hub.lora_merge`) also a merged
Hugging Face checkpoint that plain ``transformers`` loads.
"""

from __future__ import annotations

from training_hub.algorithms.base import DeclaredAlgorithm, convenience_function
from training_hub.config.algorithms import LoRAParams, LoRASFTConfig, LoRAUpstreamParams

__all__ = ["LoRAParams", "LoRASFTAlgorithm", "LoRASFTConfig", "LoRAUpstreamParams", "lora_sft"]


class LoRASFTAlgorithm(DeclaredAlgorithm):
    """Supervised fine-tuning of LoRA adapters."""

    name = "lora_sft"
    config_class = LoRASFTConfig
    backend_preference = ("native", "trl")


lora_sft = convenience_function(LoRASFTAlgorithm, "Supervised fine-tuning of LoRA adapters (PEFT) on chat data; "
                                "optionally merged into a full checkpoint.")
