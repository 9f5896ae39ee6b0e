"""GRPO: reinforcement learning from verifiable rewards, full-parameter (``grpo``) or on LoRA adapters
(``lora_grpo``), with upstream Training Hub 0.11's names.

Each iteration draws ``prompt_batch_size`` prompts, samples ``group_size`` completions of each with the policy,
scores them with ``reward_fn`` and moves the policy towards the completions that beat their group's mean. The
parameters are declared in ``training_hub.config.grpo``; the native loop is ``training_hub.engine.grpo``; the
built-in rewards are in ``training_hub.algorithms.rewards``.
"""

from __future__ import annotations

from training_hub.algorithms.base import DeclaredAlgorithm, convenience_function
from training_hub.config.grpo import GRPOConfig, LoRAGRPOConfig

__all__ = ["GRPOAlgorithm", "GRPOConfig", "LoRAGRPOAlgorithm", "LoRAGRPOConfig", "grpo", "lora_grpo"]


class GRPOAlgorithm(DeclaredAlgorithm):
    """Group Relative Policy Optimization (Shao et al., 2024), Dr. GRPO by default (Liu et al., 2025)."""

    name = "grpo"
    config_class = GRPOConfig
    backend_preference = ("native", "trl")


class LoRAGRPOAlgorithm(DeclaredAlgorithm):
    """GRPO training LoRA adapters on a frozen base model."""

    name = "lora_grpo"
    config_class = LoRAGRPOConfig
    backend_preference = ("native", "trl")


grpo = convenience_function(GRPOAlgorithm, "GRPO (reinforcement learning from verifiable rewards) on prompts with "
                            "a ground truth and a reward function; full-parameter training.")
lora_grpo = convenience_function(LoRAGRPOAlgorithm, "GRPO (reinforcement learning from verifiable rewards) training "
                                 "LoRA adapters; optionally merged into a full checkpoint.")
