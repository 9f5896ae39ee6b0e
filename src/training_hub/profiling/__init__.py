"""Upstream's module paths for the estimators (``training_hub.profiling.memory_estimator`` and
``training_hub.profiling.timing_estimator``); the code is ``training_hub.planning``."""
