"""What an SFT-style algorithm may change in our loop, as one small object the loop calls at fixed points.

Plain SFT uses :class:`TrainingMethod` as is (every hook a no-op). OSFT (``training_hub.engine.osft``) swaps the
target layers for their SVD factors, projects each step and saves dense weights. The loop stays one loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class TrainingMethod:
    """Hooks of the native loop, in the order it calls them."""

    # Name HF checkpoints ``samples_<N>.0`` (upstream's OSFT engine) instead of ``samples_<N>``.
    float_checkpoint_names = False

    def prepare_model(self, model) -> None:
        """After the model is loaded, before the optimizer is built (and before a training state is restored)."""

    def plan_keys(self) -> dict[str, Any]:
        """Settings a resumed run must share with the run it continues (beyond data order and batching)."""
        return {}

    def before_step(self, model) -> None:
        """After the last backward of an optimizer step, before gradient clipping and ``optimizer.step()``."""

    def after_step(self, model) -> None:
        """Right after ``optimizer.step()``."""

    def export_state_dict(self, model, state_dict: dict | None = None) -> dict | None:
        """Weights for the Hugging Face checkpoint under the model's original names (None: its own state dict).

        ``state_dict``: the model's full state dict when the model itself holds only shards (FSDP2; rank 0 only).
        """
        return None

    def save_model(self, model, directory: Path, save_dtype, state_dict: dict | None = None) -> bool:
        """Write the model part of a checkpoint into ``directory`` (still under its temporary name) yourself.

        Return True if you wrote it (e.g. LoRA writes only the adapter, in PEFT format); False lets the loop save
        the full model (``export_state_dict`` cast to ``save_dtype``). The tokenizer is saved by the loop either way.
        ``state_dict``: what the loop would save (None: the model's own; FSDP2: gathered from the shards).
        """
        return False
