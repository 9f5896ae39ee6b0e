"""LoRA (and DoRA) as a :class:`~training_hub.engine.method.TrainingMethod` of the native SFT loop.

``prepare_model`` injects PEFT LoRA layers into the loaded model in place (``peft.inject_adapter_in_model``), which
freezes every base weight, so the loop's optimizer sees only the adapter. ``save_model`` writes the adapter in PEFT
format (``adapter_config.json`` + ``adapter_model.safetensors``, keys as ``PeftModel.save_pretrained`` writes them),
which ``PeftModel.from_pretrained(base, directory)`` loads. The adapter is stored in float32 whatever the base
model's dtype (it is small, and merging it stays exact); ``training_hub.lora_merge.merge_adapter`` makes the merged
checkpoint.

The adapter's initialisation is PEFT's (``lora_A`` Kaiming-uniform, ``lora_B`` zero, so the model's output before
the first step is the base model's), drawn from torch's RNG seeded with ``seed`` right before the injection, as
TRL's ``SFTTrainer`` does before ``get_peft_model``: both backends start from the same adapter.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from training_hub.engine.method import TrainingMethod

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before the base model's own names


class LoRAMethod(TrainingMethod):
    """Train PEFT LoRA adapters on a frozen base model; checkpoints are the adapter in PEFT format."""

    def __init__(self, *, model_path: str, r: int, alpha: float, dropout: float, target_modules: list[str] | None,
                 use_dora: bool, seed: int):
        self.model_path = str(model_path)
        self.seed = seed
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.target_modules = target_modules
        self.use_dora = use_dora
        self.peft_config = None

    @classmethod
    def from_config(cls, config) -> "LoRAMethod":
        return cls(model_path=config.model_path, r=config.lora_r, alpha=config.lora_alpha,
                   dropout=config.lora_dropout, target_modules=config.target_modules, use_dora=config.use_dora,
                   seed=config.seed)

    def lora_config(self):
        from peft import LoraConfig

        targets = self.target_modules
        if targets is None or targets == ["all-linear"]:  # upstream's default: every linear projection
            targets = "all-linear"
        else:
            targets = list(targets)
        alpha = int(self.alpha) if float(self.alpha).is_integer() else self.alpha
        return LoraConfig(r=self.r, lora_alpha=alpha, lora_dropout=self.dropout, target_modules=targets,
                          use_dora=self.use_dora, bias="none", task_type="CAUSAL_LM",
                          base_model_name_or_path=self.model_path)

    def prepare_model(self, model) -> None:
        import torch
        from peft import inject_adapter_in_model

        torch.manual_seed(self.seed)  # the adapter's initialisation depends on the seed only
        inject_adapter_in_model(self.lora_config(), model)  # in place; base weights frozen
        self.peft_config = model.peft_config["default"]
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        logger.info("LoRA: r=%d alpha=%s%s on %s; %d of %d parameter elements train", self.r, self.alpha,
                    " (DoRA)" if self.use_dora else "", sorted(self.peft_config.target_modules), trainable, total)

    def plan_keys(self) -> dict[str, Any]:
        # A resumed run must inject the same adapter, or its saved weights do not fit.
        return {"lora_r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "target_modules": self.target_modules, "use_dora": self.use_dora}

    def save_model(self, model, directory: Path, save_dtype, state_dict: dict | None = None) -> bool:
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        weights = {PEFT_PREFIX + name: tensor.detach().contiguous().cpu()
                   for name, tensor in get_peft_model_state_dict(model, state_dict=state_dict).items()}
        save_file(weights, str(Path(directory) / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config = copy.copy(self.peft_config)
        config.inference_mode = True  # as PeftModel.save_pretrained records it
        config.save_pretrained(str(directory))  # adapter_config.json
        return True
