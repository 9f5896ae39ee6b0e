"""Supervised fine-tuning: chat data (loss on assistant turns) and continual pretraining."""

from __future__ import annotations

from dataclasses import dataclass

from training_hub.algorithms.base import DeclaredAlgorithm, convenience_function
from training_hub.config.groups import SFT_GROUPS, config_bases


@dataclass(kw_only=True)
class SFTConfig(*config_bases(*SFT_GROUPS)):
    """Every parameter of ``sft()``; the engine groups are shared with the other algorithms."""


class SFTAlgorithm(DeclaredAlgorithm):
    """Supervised fine-tuning."""

    name = "sft"
    config_class = SFTConfig
    # The upstream default where it can run (CUDA and the extra installed), else our engine.
    backend_preference = ("instructlab-training", "native")


sft = convenience_function(SFTAlgorithm, "Supervised fine-tuning of a causal language model on chat or text data.")
