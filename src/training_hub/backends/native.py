"""The ``native`` backend: our own PyTorch engine (``training_hub.engine``), CPU or CUDA."""

from __future__ import annotations

import importlib.util
from typing import Any, Dict

from training_hub.config.declare import validate_params
from training_hub.registry import Availability, Backend


def _missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


class NativeSFTBackend(Backend):
    """SFT in our own training loop (token-budget packing, exact loss normalisation, HF checkpoints)."""

    @classmethod
    def is_available(cls) -> Availability:
        missing = _missing("torch", "transformers", "datasets")
        if missing:
            return Availability(False, f"needs {', '.join(missing)} (pip install training-hub)")
        return Availability(True)

    def execute_training(self, algorithm_params: Dict[str, Any]) -> Any:
        from training_hub.algorithms.sft import SFTConfig
        from training_hub.engine.trainer import train_sft

        config = validate_params(SFTConfig, algorithm_params, what="the native sft backend")
        return train_sft(config)


class NativeOSFTBackend(NativeSFTBackend):
    """OSFT in the same loop: SVD-split targets, projected steps, dense Hugging Face checkpoints."""

    def execute_training(self, algorithm_params: Dict[str, Any]) -> Any:
        from training_hub.algorithms.osft import OSFTConfig
        from training_hub.engine.trainer import train_sft
        from training_hub.osft_core.method import OSFTMethod

        config = validate_params(OSFTConfig, algorithm_params, what="the native osft backend")
        return train_sft(config, method=OSFTMethod.from_config(config))
