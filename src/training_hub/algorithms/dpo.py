"""Direct Preference Optimization: train on (prompt, chosen, rejected) pairs against a frozen reference model.

The loss itself lives in :mod:`training_hub.losses.dpo`; the parameters are declared once in
``training_hub.config.algorithms``; this module provides ``DPOAlgorithm`` and the ``dpo()`` convenience function.
"""

from __future__ import annotations

from training_hub.algorithms.base import DeclaredAlgorithm, convenience_function
from training_hub.config.algorithms import DPO_LOSS_TYPES, DPOConfig, DPOParams

__all__ = ["DPO_LOSS_TYPES", "DPOAlgorithm", "DPOConfig", "DPOParams", "dpo"]


class DPOAlgorithm(DeclaredAlgorithm):
    """Direct Preference Optimization (Rafailov et al., 2023)."""

    name = "dpo"
    config_class = DPOConfig
    backend_preference = ("native", "trl")


dpo = convenience_function(DPOAlgorithm, "Direct Preference Optimization on prompt/chosen/rejected pairs.")
