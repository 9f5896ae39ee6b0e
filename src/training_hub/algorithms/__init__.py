"""Built-in algorithms: one module each (its Algorithm class and convenience function; the configs are in
``training_hub.config.algorithms``). Registration is ``training_hub.builtins``."""

from training_hub.algorithms.dpo import DPOAlgorithm, DPOConfig, dpo
from training_hub.algorithms.grpo import GRPOAlgorithm, GRPOConfig, LoRAGRPOAlgorithm, LoRAGRPOConfig, grpo, lora_grpo
from training_hub.algorithms.embedding_sft import EmbeddingSFTAlgorithm, EmbeddingSFTConfig, embedding_sft
from training_hub.algorithms.lora import LoRASFTAlgorithm, LoRASFTConfig, lora_sft
from training_hub.algorithms.osft import OSFTAlgorithm, OSFTConfig, osft
from training_hub.algorithms.sft import SFTAlgorithm, SFTConfig, sft

__all__ = ["DPOAlgorithm", "DPOConfig", "EmbeddingSFTAlgorithm", "EmbeddingSFTConfig", "GRPOAlgorithm", "GRPOConfig", "LoRAGRPOAlgorithm",
           "LoRAGRPOConfig", "LoRASFTAlgorithm", "LoRASFTConfig", "OSFTAlgorithm", "OSFTConfig",
           "SFTAlgorithm", "SFTConfig", "dpo", "embedding_sft", "grpo", "lora_grpo", "lora_sft", "osft", "sft"]
