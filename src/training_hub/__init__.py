"""Training Hub: LLM post-training in one call, with pluggable backends.

``import training_hub`` is cheap: torch, transformers and backend frameworks are imported only when a
training run (or a backend's availability check) needs them.
"""

from training_hub.registry import Algorithm, AlgorithmRegistry, Availability, Backend, create_algorithm
from training_hub.result import TrainingResult
from training_hub.algorithms import SFTAlgorithm, SFTConfig, sft
from training_hub.config.declare import ParameterError

__version__ = "0.1.0"

__all__ = [
    "Algorithm", "AlgorithmRegistry", "Availability", "Backend", "ParameterError", "SFTAlgorithm", "SFTConfig",
    "TrainingResult", "create_algorithm", "sft",
]
