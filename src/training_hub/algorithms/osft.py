"""OSFT: orthogonal subspace fine-tuning (Nayak et al. 2025, arXiv:2504.07097), continual learning that keeps
each target weight's top singular directions fixed. The method lives in :mod:`training_hub.osft_core`."""

from __future__ import annotations

from training_hub.algorithms.base import DeclaredAlgorithm, convenience_function
from training_hub.config.algorithms import OSFTConfig, OSFTParams

__all__ = ["OSFTAlgorithm", "OSFTConfig", "OSFTParams", "osft"]


class OSFTAlgorithm(DeclaredAlgorithm):
    """Orthogonal subspace fine-tuning: learn new tasks in the directions the model uses least."""

    name = "osft"
    config_class = OSFTConfig
    # The upstream default where it can run (CUDA and the extra installed), else our engine.
    backend_preference = ("mini-trainer", "native")


osft = convenience_function(OSFTAlgorithm, "Orthogonal subspace fine-tuning (continual learning without "
                            "forgetting) on chat or text data.")
