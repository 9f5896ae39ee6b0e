"""Upstream's ``training_hub.profiling.memory_estimator`` names, answered by the engine's planner
(``training_hub.planning``)."""

from training_hub.planning import (
    BasicEstimator, LoRAEstimator, OSFTEstimator, OSFTEstimatorExperimental, QLoRAEstimator, estimate,
)

__all__ = ["BasicEstimator", "LoRAEstimator", "OSFTEstimator", "OSFTEstimatorExperimental", "QLoRAEstimator",
           "estimate"]
