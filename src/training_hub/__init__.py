"""Training Hub: LLM post-training in one call, with pluggable backends.

``import training_hub`` is cheap: torch, transformers and backend frameworks are imported only when a
training run (or a backend's availability check) needs them. Type checkers read ``__init__.pyi``, generated from
the parameter declarations (``python -m training_hub.docs_gen``).
"""

import logging as _logging
import os as _os


class _ToRootOrStderr(_logging.StreamHandler):
    """The package logger's one handler: a record goes to the application's root handlers when it has set any
    (``basicConfig``, pytest's capture, a backend that configures logging mid-run), else to stderr. Once either
    way, never twice, and the root logger itself is never touched."""

    def emit(self, record: _logging.LogRecord) -> None:
        if _logging.root.handlers:
            ours = _logging.getLogger("training_hub").handlers  # one also put here (pytest's capture) has it already
            for handler in _logging.root.handlers:
                if handler not in ours and record.levelno >= handler.level:
                    handler.handle(record)
        else:
            super().emit(record)


def _configure_package_logging() -> None:
    """Make the ``training_hub`` logger's INFO records (the resume decision, validation losses, the data read)
    visible in a process that configured no logging, at the level ``TRAINING_HUB_LOG_LEVEL`` names (default INFO).
    Idempotent."""
    logger = _logging.getLogger("training_hub")
    level = _os.environ.get("TRAINING_HUB_LOG_LEVEL", "INFO").strip().upper() or "INFO"
    logger.setLevel(level if isinstance(_logging.getLevelName(level), int) else "INFO")
    if not any(isinstance(h, _ToRootOrStderr) for h in logger.handlers):
        handler = _ToRootOrStderr()
        handler.setFormatter(_logging.Formatter("[%(name)s|%(levelname)s] %(message)s"))
        logger.addHandler(handler)
    logger.propagate = False  # the handler forwards to the root's handlers itself


_configure_package_logging()

from training_hub.registry import Algorithm, AlgorithmRegistry, Availability, Backend, create_algorithm
from training_hub.result import TrainingResult
from training_hub.algorithms import (
    DPOAlgorithm, DPOConfig, EmbeddingSFTAlgorithm, EmbeddingSFTConfig, LoRASFTAlgorithm, LoRASFTConfig, OSFTAlgorithm,
    OSFTConfig, SFTAlgorithm, SFTConfig,
    dpo, embedding_sft, lora_sft, osft, sft,
)
from training_hub.algorithms.grpo import GRPOAlgorithm, GRPOConfig, LoRAGRPOAlgorithm, LoRAGRPOConfig, grpo, lora_grpo
from training_hub.data.rewards import binary_reward, tool_call_reward
from training_hub.backends.instructlab_training import InstructLabTrainingSFTBackend
from training_hub.backends.mini_trainer_osft import MiniTrainerOSFTBackend
from training_hub.backends.sentence_transformers import SentenceTransformersBackend
from training_hub.callbacks import TrainingContext, TrainingHubCallback, TrainingHubContext
from training_hub.callbacks import TrainingHubControl, merge_default_callbacks
from training_hub.jit_checkpoint import JITCheckpointCallback, RemoteCheckpointSyncCallback
from training_hub.config.declare import ParameterError
from training_hub.config.upstream import UpstreamParameterWarning

__version__ = "0.1.0"

__all__ = [
    "Algorithm", "AlgorithmRegistry", "Availability", "Backend", "DPOAlgorithm", "DPOConfig", "EmbeddingSFTAlgorithm",
    "EmbeddingSFTConfig",
    "InstructLabTrainingSFTBackend", "LoRASFTAlgorithm", "LoRASFTConfig", "MiniTrainerOSFTBackend", "OSFTAlgorithm",
    "OSFTConfig", "ParameterError", "SFTAlgorithm", "SFTConfig", "SentenceTransformersBackend", "TrainingContext", "TrainingHubCallback",
    "TrainingHubContext", "TrainingResult", "UpstreamParameterWarning", "create_algorithm", "dpo", "embedding_sft", "lora_sft",
    "merge_adapter", "osft", "plot_loss", "sft",
    "GRPOAlgorithm", "GRPOConfig", "LoRAGRPOAlgorithm", "LoRAGRPOConfig", "binary_reward", "grpo", "lora_grpo",
    "tool_call_reward", "welcome",
    "JITCheckpointCallback", "RemoteCheckpointSyncCallback", "TrainingHubControl", "merge_default_callbacks",
    "BasicEstimator", "LoRAEstimator", "OSFTEstimator", "OSFTEstimatorExperimental", "QLoRAEstimator", "estimate",
    "plan", "time_estimate",
]

# Planning (training_hub.planning): loaded on first use.
_PLANNING = ("BasicEstimator", "LoRAEstimator", "OSFTEstimator", "OSFTEstimatorExperimental", "QLoRAEstimator",
             "estimate", "plan", "time_estimate")


def welcome() -> None:
    """Upstream's greeting, with what this install offers: its version and algorithms."""
    print(f"Hello from training-hub {__version__}! Algorithms: {', '.join(AlgorithmRegistry.list_algorithms())}. "
          "`thub list` shows which backends run on this machine.")


def __getattr__(name: str):
    """Heavier helpers load on first use, keeping ``import training_hub`` cheap."""
    if name == "merge_adapter":
        from training_hub.lora_merge import merge_adapter
        return merge_adapter
    if name == "plot_loss":
        from training_hub.plot import plot_loss
        return plot_loss
    if name in _PLANNING:
        from training_hub import planning
        return getattr(planning, name)
    raise AttributeError(f"module 'training_hub' has no attribute {name!r}")
