"""Built-in algorithms. Importing this package registers them and their backends (all cheap imports)."""

from training_hub.algorithms.sft import SFTAlgorithm, SFTConfig, sft
from training_hub.backends.native import NativeSFTBackend
from training_hub.registry import AlgorithmRegistry

AlgorithmRegistry._add_builtin("sft", SFTAlgorithm, {"native": NativeSFTBackend})

__all__ = ["SFTAlgorithm", "SFTConfig", "sft"]
