"""The ``native`` backend: our own PyTorch engine (``training_hub.engine``), CPU or CUDA."""

from __future__ import annotations

import importlib.util
from typing import Any, Dict

from training_hub.config.declare import validate_params
from training_hub.registry import Availability, Backend


QLORA_NOT_HERE = "load_in_4bit: the native backend does not train QLoRA (4-bit base) yet; use backend='trl'"


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
        from training_hub.engine.launch import run_training

        config = validate_params(SFTConfig, algorithm_params, what="the native sft backend")
        return run_training(config)  # here, or through torchrun when nproc_per_node x nnodes > 1


class NativeOSFTBackend(NativeSFTBackend):
    """OSFT in the same loop: SVD-split targets, projected steps, dense Hugging Face checkpoints."""

    def execute_training(self, algorithm_params: Dict[str, Any]) -> Any:
        from training_hub.algorithms.osft import OSFTConfig
        from training_hub.engine.launch import run_training
        from training_hub.osft_core.method import OSFTMethod

        config = validate_params(OSFTConfig, algorithm_params, what="the native osft backend")
        return run_training(config, OSFTMethod)


class NativeLoRASFTBackend(NativeSFTBackend):
    """LoRA/DoRA SFT in the same loop: PEFT adapters on a frozen base; checkpoints are the adapter in PEFT format.

    ``checkpoint_path`` is the adapter directory; with ``merge=True`` the merged checkpoint is in
    ``result["merged_path"]`` (also ``result.metrics["merged_path"]``). QLoRA (``load_in_4bit``) is the trl
    backend's.
    """

    @classmethod
    def refusals(cls, config, given: set[str]) -> list[str]:
        """QLoRA is the trl backend's (used to choose the default backend)."""
        return [QLORA_NOT_HERE] if config.load_in_4bit else []

    @classmethod
    def is_available(cls) -> Availability:
        missing = _missing("torch", "transformers", "datasets", "peft")
        if missing:
            return Availability(False, f"needs {', '.join(missing)} (pip install training-hub[peft])")
        return Availability(True)

    def execute_training(self, algorithm_params: Dict[str, Any]) -> Any:
        from pathlib import Path

        from training_hub.algorithms.lora import LoRASFTConfig, qlora_problems
        from training_hub.engine.lora import LoRAMethod
        from training_hub.engine.trainer import train_sft

        config = validate_params(LoRASFTConfig, algorithm_params, what="the native lora_sft backend")
        if config.load_in_4bit:  # before any data, model or output directory is touched
            problems = qlora_problems() or [QLORA_NOT_HERE]
            raise ValueError("\n".join(problems))
        result = train_sft(config, method=LoRAMethod.from_config(config))
        if config.merge and result.checkpoint_path:
            from training_hub.lora_merge import merge_adapter

            merged = str(merge_adapter(result.checkpoint_path, Path(config.ckpt_output_dir) / "merged",
                                       trust_remote_code=config.trust_remote_code))
            result.metrics["merged_path"] = merged
            result.extra["merged_path"] = merged
        return result


class NativeDPOBackend(NativeSFTBackend):
    """DPO (sigmoid loss) in our own loop: reference log-probs computed once, pairs packed without padding."""

    def execute_training(self, algorithm_params: Dict[str, Any]) -> Any:
        from training_hub.algorithms.dpo import DPOConfig
        from training_hub.engine.dpo import train_dpo

        config = validate_params(DPOConfig, algorithm_params, what="the native dpo backend")
        return train_dpo(config)
