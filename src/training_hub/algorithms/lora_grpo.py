"""Upstream's module path for GRPO (``from training_hub.algorithms.lora_grpo import lora_grpo``; its CLI looks the
functions up here too). Ours live in :mod:`training_hub.algorithms.grpo`."""

from training_hub.algorithms.grpo import GRPOAlgorithm, GRPOConfig, LoRAGRPOAlgorithm, LoRAGRPOConfig, grpo, lora_grpo

__all__ = ["GRPOAlgorithm", "GRPOConfig", "LoRAGRPOAlgorithm", "LoRAGRPOConfig", "grpo", "lora_grpo"]
