"""The ``native`` backend: our own PyTorch engine (``training_hub.engine``), CPU or CUDA."""

from __future__ import annotations

from typing import Any, ClassVar, Dict

from training_hub.backends.common import BuiltinBackend, add_lora_models, availability_of, qlora_problems
from training_hub.config.algorithms import DPOConfig, LoRASFTConfig, OSFTConfig, SFTConfig
from training_hub.config.processes import in_torchrun_worker, process_count
from training_hub.registry import Availability

QLORA_NOT_HERE = "load_in_4bit: the native backend does not train QLoRA (4-bit base) yet; use backend='trl'"


class NativeSFTBackend(BuiltinBackend):
    """SFT in our own training loop (token-budget packing, exact loss normalisation, HF checkpoints)."""

    name, algorithm = "native", "sft"
    needs: ClassVar[tuple[str, ...]] = ("torch", "transformers", "datasets")
    install_hint: ClassVar[str] = "pip install training-hub"
    upstream_handles: ClassVar[tuple[str, ...]] = ("use_liger",)  # on CUDA with liger-kernel: engine.loss
    upstream_needs: ClassVar[dict[str, str]] = {"use_liger": "liger_kernel"}

    @classmethod
    def is_available(cls) -> Availability:
        return availability_of(cls.needs, cls.install_hint)

    @classmethod
    def config_class(cls) -> type:
        return SFTConfig

    def run(self, config: Any, given: set[str], options: Dict[str, Any]) -> Any:
        from training_hub.engine.launch import run_training

        return run_training(config)  # here, or through torchrun when nproc_per_node x nnodes > 1


class NativeOSFTBackend(NativeSFTBackend):
    """OSFT in the same loop: SVD-split targets, projected steps, dense Hugging Face checkpoints."""

    algorithm = "osft"

    @classmethod
    def config_class(cls) -> type:
        return OSFTConfig

    def run(self, config: Any, given: set[str], options: Dict[str, Any]) -> Any:
        from training_hub.engine.launch import run_training
        from training_hub.engine.osft import OSFTMethod

        return run_training(config, OSFTMethod)


class NativeLoRASFTBackend(NativeSFTBackend):
    """LoRA/DoRA SFT in the same loop: PEFT adapters on a frozen base; checkpoints are the adapter in PEFT format.

    ``checkpoint_path`` is the adapter directory; with ``merge=True`` the merged checkpoint is in
    ``result["merged_path"]`` (also ``result.metrics["merged_path"]``). QLoRA (``load_in_4bit``) is the trl
    backend's.
    """

    algorithm = "lora_sft"
    needs = NativeSFTBackend.needs + ("peft",)
    install_hint = "pip install training-hub[peft]"

    @classmethod
    def config_class(cls) -> type:
        return LoRASFTConfig

    @classmethod
    def refusals(cls, config: Any, given: set[str]) -> list[str]:
        problems = (qlora_problems() or [QLORA_NOT_HERE]) if config.load_in_4bit else []  # trl only where it can
        if not in_torchrun_worker() and process_count(config) > 1:
            problems.append("nproc_per_node/nnodes: the native lora_sft backend trains in the calling process; "
                            "for several processes run your script under torchrun")
        return problems

    def run(self, config: Any, given: set[str], options: Dict[str, Any]) -> Any:
        from pathlib import Path

        from training_hub.engine.lora import LoRAMethod
        from training_hub.engine.trainer import train_sft
        from training_hub.lora_merge import merge_adapter

        result = train_sft(config, method=LoRAMethod.from_config(config))
        if config.merge and result.checkpoint_path:
            merged = str(merge_adapter(result.checkpoint_path, Path(config.ckpt_output_dir) / "merged",
                                       trust_remote_code=config.trust_remote_code))
            result.metrics["merged_path"] = merged
            result.extra["merged_path"] = merged
        return add_lora_models(result, config)


class NativeDPOBackend(NativeSFTBackend):
    """DPO (sigmoid loss) in our own loop: reference log-probs computed once, pairs packed without padding."""

    algorithm = "dpo"
    upstream_handles: ClassVar[tuple[str, ...]] = ()  # its loss is on sequence log-probs: no Liger kernel used

    @classmethod
    def config_class(cls) -> type:
        return DPOConfig

    @classmethod
    def refusals(cls, config: Any, given: set[str]) -> list[str]:
        problems = []
        if config.loss_type != "sigmoid":
            problems.append(f"loss_type={config.loss_type!r}: the native dpo backend implements only the sigmoid "
                            "loss; use backend='trl' for hinge or ipo")
        if process_count(config) > 1:
            problems.append(f"nproc_per_node={config.nproc_per_node}, nnodes={config.nnodes}: the native dpo backend "
                            "trains in one process; use nproc_per_node=1 and nnodes=1, or backend='trl' under torchrun")
        return problems

    def run(self, config: Any, given: set[str], options: Dict[str, Any]) -> Any:
        from training_hub.engine.dpo import train_dpo

        return train_dpo(config)
