"""Built-in algorithms. Importing this package registers them and their backends (all cheap imports)."""

from training_hub.algorithms.dpo import DPOAlgorithm, DPOConfig, dpo
from training_hub.algorithms.lora import LoRASFTAlgorithm, LoRASFTConfig, lora_sft
from training_hub.algorithms.osft import OSFTAlgorithm, OSFTConfig, osft
from training_hub.algorithms.sft import SFTAlgorithm, SFTConfig, sft
from training_hub.backends.instructlab_training import InstructLabTrainingSFTBackend
from training_hub.backends.mini_trainer_osft import MiniTrainerOSFTBackend, MiniTrainerSFTBackend
from training_hub.backends.native import NativeDPOBackend, NativeLoRASFTBackend, NativeOSFTBackend, NativeSFTBackend
from training_hub.backends.trl import TRLDPOBackend, TRLLoRASFTBackend, TRLSFTBackend
from training_hub.registry import AlgorithmRegistry

AlgorithmRegistry._add_builtin("sft", SFTAlgorithm, {"native": NativeSFTBackend, "trl": TRLSFTBackend,
                                                     "instructlab-training": InstructLabTrainingSFTBackend,
                                                     "mini-trainer": MiniTrainerSFTBackend})
AlgorithmRegistry._add_builtin("osft", OSFTAlgorithm, {"native": NativeOSFTBackend,
                                                       "mini-trainer": MiniTrainerOSFTBackend})
AlgorithmRegistry._add_builtin("lora_sft", LoRASFTAlgorithm, {"native": NativeLoRASFTBackend, "trl": TRLLoRASFTBackend})
AlgorithmRegistry._add_builtin("dpo", DPOAlgorithm, {"native": NativeDPOBackend, "trl": TRLDPOBackend})

__all__ = ["DPOAlgorithm", "DPOConfig", "LoRASFTAlgorithm", "LoRASFTConfig", "OSFTAlgorithm", "OSFTConfig",
           "SFTAlgorithm", "SFTConfig", "dpo", "lora_sft", "osft", "sft"]
