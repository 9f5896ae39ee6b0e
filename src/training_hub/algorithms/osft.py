"""OSFT: orthogonal subspace fine-tuning (Nayak et al. 2025, arXiv:2504.07097), continual learning that keeps
each target weight's top singular directions fixed. The method lives in :mod:`training_hub.osft_core`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from training_hub.algorithms.base import DeclaredAlgorithm, convenience_function
from training_hub.config.declare import DeclaredConfig, param
from training_hub.config.groups import SFT_GROUPS, config_bases


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
               "such a mode (ignored, with a warning).")
    save_best_val_loss: bool = param(
        False, "Upstream mini-trainer option: also save when the validation loss improves (mini-trainer backend; "
               "ignored by native, with a warning: use eval_steps with save_samples instead).")


@dataclass(kw_only=True)
class OSFTConfig(OSFTParams, *config_bases(*SFT_GROUPS)):
    """Every parameter of ``osft()``: all of ``sft()``'s (engine, data, checkpoints) plus the OSFT ones."""


class OSFTAlgorithm(DeclaredAlgorithm):
    """Orthogonal subspace fine-tuning: learn new tasks in the directions the model uses least."""

    name = "osft"
    config_class = OSFTConfig
    # The upstream default where it can run (CUDA and the extra installed), else our engine.
    backend_preference = ("mini-trainer", "native")


osft = convenience_function(OSFTAlgorithm, "Orthogonal subspace fine-tuning (continual learning without "
                            "forgetting) on chat or text data.")
