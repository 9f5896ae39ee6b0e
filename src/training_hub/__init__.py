"""Training Hub: LLM post-training in one call, with pluggable backends.

``import training_hub`` is cheap: torch, transformers and backend frameworks are imported only when a
training run (or a backend's availability check) needs them. Type checkers read ``__init__.pyi``, generated from
the parameter declarations (``python -m training_hub.docs_gen``).
"""

from training_hub.registry import Algorithm, AlgorithmRegistry, Availability, Backend, create_algorithm
from training_hub.result import TrainingResult
from training_hub.algorithms import (
    DPOAlgorithm, DPOConfig, LoRASFTAlgorithm, LoRASFTConfig, OSFTAlgorithm, OSFTConfig, SFTAlgorithm, SFTConfig,
    dpo, lora_sft, osft, sft,
)
from training_hub.backends.instructlab_training import InstructLabTrainingSFTBackend
from training_hub.backends.mini_trainer_osft import MiniTrainerOSFTBackend
from training_hub.callbacks import TrainingContext, TrainingHubCallback, TrainingHubContext
from training_hub.config.declare import ParameterError
from training_hub.config.upstream import UpstreamParameterWarning

__version__ = "0.1.0"

__all__ = [
    "Algorithm", "AlgorithmRegistry", "Availability", "Backend", "DPOAlgorithm", "DPOConfig",
    "InstructLabTrainingSFTBackend", "LoRASFTAlgorithm", "LoRASFTConfig", "MiniTrainerOSFTBackend", "OSFTAlgorithm",
    "OSFTConfig", "ParameterError", "SFTAlgorithm", "SFTConfig", "TrainingContext", "TrainingHubCallback",
    "TrainingHubContext", "TrainingResult", "UpstreamParameterWarning", "create_algorithm", "dpo", "lora_sft",
    "merge_adapter", "osft", "plot_loss", "sft",
]


def __getattr__(name: str):
    """Heavier helpers load on first use, keeping ``import training_hub`` cheap."""
    if name == "merge_adapter":
        from training_hub.lora_merge import merge_adapter
        return merge_adapter
    if name == "plot_loss":
        from training_hub.plot import plot_loss
        return plot_loss
    raise AttributeError(f"module 'training_hub' has no attribute {name!r}")
