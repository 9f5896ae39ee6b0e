"""Upstream's ``training_hub.profiling.timing_estimator.time_estimate``, answered by the engine's planner
(``training_hub.planning``): a few of the run's own steps timed here, nothing trained to completion."""

from training_hub.planning import time_estimate

__all__ = ["time_estimate"]
