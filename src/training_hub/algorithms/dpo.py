"""Direct Preference Optimization: train on (prompt, chosen, rejected) pairs against a frozen reference model.

The loss itself lives in :mod:`training_hub.losses.dpo`; this module declares the parameters once and provides
``DPOAlgorithm`` and the ``dpo()`` convenience function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from training_hub.algorithms.base import DeclaredAlgorithm, convenience_function
from training_hub.config.declare import DeclaredConfig, param
from training_hub.config.groups import TRAINING_GROUPS, config_bases

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")


@dataclass(kw_only=True)
class DPOParams(DeclaredConfig):
    group_title = "DPO"

    beta: float = param(0.1, "Strength of the pull towards the reference model (the beta of the DPO loss; "
                             "for ipo, its regularisation tau).", gt=0.0)
    loss_type: Literal["sigmoid", "hinge", "ipo"] = param(
        "sigmoid", "Preference loss: sigmoid (the DPO paper), hinge (SLiC) or ipo (IPO, length-normalised).")
    max_length: Optional[int] = param(
        None, "Longest prompt+completion, in tokens (default: max_seq_len); see truncate_long_samples.", gt=0)
    max_prompt_length: Optional[int] = param(
        None, "Keep at most the last N prompt tokens of each pair (None: keep the whole prompt).", gt=0)


@dataclass(kw_only=True)
class DPOConfig(DPOParams, *config_bases(*TRAINING_GROUPS)):
    """Every parameter of ``dpo()``: the engine groups shared with the other algorithms plus the DPO ones."""

    def checks(self) -> list[str]:
        problems = super().checks()
        length = self.effective_max_length
        if self.max_prompt_length is not None and self.max_prompt_length >= length:
            problems.append(f"max_prompt_length: {self.max_prompt_length} leaves no room for the completion "
                            f"within max_length {length}")
        return problems

    @property
    def effective_max_length(self) -> int:
        """``max_length`` if given, else ``max_seq_len``."""
        return self.max_length if self.max_length is not None else self.max_seq_len


class DPOAlgorithm(DeclaredAlgorithm):
    """Direct Preference Optimization (Rafailov et al., 2023)."""

    name = "dpo"
    config_class = DPOConfig
    backend_preference = ("native", "trl")


dpo = convenience_function(DPOAlgorithm, "Direct Preference Optimization on prompt/chosen/rejected pairs.")
