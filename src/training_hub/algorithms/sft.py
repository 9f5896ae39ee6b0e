"""Supervised fine-tuning: chat data (loss on assistant turns) and continual pretraining."""

from __future__ import annotations

from training_hub.algorithms.base import DeclaredAlgorithm, convenience_function
from training_hub.config.algorithms import SFTConfig

__all__ = ["SFTAlgorithm", "SFTConfig", "sft"]


class SFTAlgorithm(DeclaredAlgorithm):
    """Supervised fine-tuning."""

    name = "sft"
    config_class = SFTConfig
    # The upstream default where it can run (CUDA and the extra installed), else our engine.
    backend_preference = ("instructlab-training", "native")


sft = convenience_function(SFTAlgorithm, "Supervised fine-tuning of a causal language model on chat or text data.")
