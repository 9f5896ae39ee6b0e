"""OSFT (``training_hub.osft_core``) as a :class:`~training_hub.engine.method.TrainingMethod` of the native loop."""

from __future__ import annotations

import logging
from typing import Any

from training_hub.engine.method import TrainingMethod
from training_hub.engine.precision import exact_fp32_matmuls
from training_hub.osft_core.decompose import apply_osft
from training_hub.osft_core.project import project_gradients, project_parameters
from training_hub.osft_core.reconstruct import dense_state_dict

logger = logging.getLogger(__name__)


class OSFTMethod(TrainingMethod):
    """Decompose the targets once, keep every step orthogonal to the frozen subspace, save dense weights."""

    float_checkpoint_names = True  # hf_format/samples_<N>.0, as upstream's OSFT engine names them

    def __init__(self, *, unfreeze_rank_ratio: float, target_patterns: list[str] | None,
                 freeze_non_targets: bool):
        self.unfreeze_rank_ratio = unfreeze_rank_ratio
        self.target_patterns = target_patterns
        self.freeze_non_targets = freeze_non_targets
        self.summary: dict[str, Any] = {}

    @classmethod
    def from_config(cls, config) -> "OSFTMethod":
        return cls(unfreeze_rank_ratio=config.unfreeze_rank_ratio, target_patterns=config.target_patterns,
                   freeze_non_targets=config.freeze_non_targets)

    def prepare_model(self, model) -> None:
        self.summary = apply_osft(model, unfreeze_rank_ratio=self.unfreeze_rank_ratio,
                                  target_patterns=self.target_patterns, freeze_non_targets=self.freeze_non_targets)
        logger.info("OSFT: %d target layers decomposed, %s of %s parameter elements train",
                    len(self.summary["targets"]), self.summary["trainable_parameters"], self.summary["total_parameters"])

    def plan_keys(self) -> dict[str, Any]:
        # A resumed run must decompose the same layers with the same split, or its saved factors do not fit.
        return {"unfreeze_rank_ratio": self.unfreeze_rank_ratio, "target_patterns": self.target_patterns,
                "freeze_non_targets": self.freeze_non_targets}

    def before_step(self, model) -> None:
        project_gradients(model)

    def after_step(self, model) -> None:
        with exact_fp32_matmuls():  # the projection keeps the frozen directions: no TF32 (osft_core.project)
            project_parameters(model)

    def export_state_dict(self, model, state_dict: dict | None = None) -> dict:
        return dense_state_dict(model, state_dict)
