"""Registration of the built-in algorithms and backends, in one place.

The registry imports this module before its first use (``AlgorithmRegistry._ensure_loaded``); every import here
is cheap (backends import their engines inside ``execute_training``).
"""

from training_hub.algorithms import DPOAlgorithm, EmbeddingSFTAlgorithm, LoRASFTAlgorithm, OSFTAlgorithm, SFTAlgorithm
from training_hub.algorithms.grpo import GRPOAlgorithm, LoRAGRPOAlgorithm
from training_hub.backends.grpo import NativeGRPOBackend, NativeLoRAGRPOBackend, TRLGRPOBackend, TRLLoRAGRPOBackend
from training_hub.backends.instructlab_training import InstructLabTrainingSFTBackend
from training_hub.backends.mini_trainer_osft import MiniTrainerOSFTBackend, MiniTrainerSFTBackend
from training_hub.backends.sentence_transformers import SentenceTransformersBackend
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
AlgorithmRegistry._add_builtin("embedding_sft", EmbeddingSFTAlgorithm,
                                {"sentence-transformers": SentenceTransformersBackend})
AlgorithmRegistry._add_builtin("grpo", GRPOAlgorithm, {"native": NativeGRPOBackend, "trl": TRLGRPOBackend})
AlgorithmRegistry._add_builtin("lora_grpo", LoRAGRPOAlgorithm, {"native": NativeLoRAGRPOBackend,
                                                                "trl": TRLLoRAGRPOBackend})
