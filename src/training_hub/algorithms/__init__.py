"""Built-in algorithms: one module each (its Algorithm class and convenience function; the configs are in
``training_hub.config.algorithms``). Registration is ``training_hub.builtins``."""

from training_hub.algorithms.dpo import DPOAlgorithm, DPOConfig, dpo
from training_hub.algorithms.lora import LoRASFTAlgorithm, LoRASFTConfig, lora_sft
from training_hub.algorithms.osft import OSFTAlgorithm, OSFTConfig, osft
from training_hub.algorithms.sft import SFTAlgorithm, SFTConfig, sft

__all__ = ["DPOAlgorithm", "DPOConfig", "LoRASFTAlgorithm", "LoRASFTConfig", "OSFTAlgorithm", "OSFTConfig",
           "SFTAlgorithm", "SFTConfig", "dpo", "lora_sft", "osft", "sft"]
