"""The declaration of ``embedding_sft()``: contrastive fine-tuning of a sentence-embedding model.

Names, defaults and meanings follow the upstream Training Hub 0.10+ ``embedding_sft()``. The optimizer, schedule and
logging groups are the shared ones (``groups.py``), so ``learning_rate``, ``seed``, ``max_steps``, ``callbacks`` and
the experiment trackers mean here what they mean for every other algorithm; ``num_epochs`` keeps upstream's
default of 20 for this algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from training_hub.config.declare import DeclaredConfig, closest, param
from training_hub.config.groups import LoggingParams, OptimizerParams, ScheduleParams

# loss_type -> the sentence-transformers loss class it builds (upstream's names).
LOSS_REGISTRY: dict[str, str] = {
    "batch_all_triplet": "BatchAllTripletLoss",
    "batch_hard_triplet": "BatchHardTripletLoss",
    "mnrl": "MultipleNegativesRankingLoss",
}
TRIPLET_LOSSES = frozenset({"batch_all_triplet", "batch_hard_triplet"})
BATCH_SAMPLERS = ("group_by_label", "no_duplicates", "default")


@dataclass(kw_only=True)
class EmbeddingParams(DeclaredConfig):
    group_title = "Embedding fine-tuning"

    model_path: str = param(doc="Sentence-transformers model, or a plain Hugging Face encoder or decoder (mean "
                                "pooling is added): a directory or a hub id in the local cache.")
    data_path: str = param(doc="Labelled texts: a .jsonl/.json/.csv/.parquet file, a directory of .jsonl/.json/"
                               ".parquet files, or a saved `datasets` dataset; each record has a text and an integer "
                               "(or class-name) label.")
    ckpt_output_dir: str = param(doc="Where the fine-tuned model is saved (SentenceTransformer(ckpt_output_dir) "
                                     "loads it), with metrics.jsonl.")
    loss_type: str = param("batch_all_triplet", "Contrastive loss: batch_all_triplet, batch_hard_triplet, or mnrl "
                                                "(multiple negatives ranking, on same-label pairs built from the "
                                                "labels).")
    loss_fn: Callable = param(None, "A sentence-transformers loss (or a callable taking the model and returning "
                                    "one) used instead of loss_type; it reads the data's columns as they are; on the "
                                    "command line a dotted path.")
    num_epochs: int = param(20, "Passes over the training data (upstream's embedding_sft default).", gt=0)
    batch_size: int = param(32, "Texts (mnrl: pairs) per batch; in-batch triplets and negatives come from it.", gt=0)
    warmup_ratio: float = param(0.1, "Linear warmup over this fraction of the steps (warmup_steps > 0 overrides it).",
                                ge=0.0, lt=1.0)
    batch_sampler: Optional[str] = param(
        None, "group_by_label, no_duplicates or default (None: group_by_label for triplet losses, no_duplicates for "
              "mnrl, default for loss_fn).")
    eval_data_path: Optional[str] = param(
        None, "Held-out labelled texts (same format): loss and nearest-neighbour label accuracy per epoch.")
    text_column: str = param("text", "Field that holds the text.")
    label_column: str = param("label", "Field that holds the label (an integer class id, or a class name).")

    def checks(self) -> list[str]:
        problems = super().checks()
        if self.loss_type not in LOSS_REGISTRY:
            hint = closest(self.loss_type, LOSS_REGISTRY)
            problems.append(f"loss_type: Unknown loss_type {self.loss_type!r}; choose from {', '.join(LOSS_REGISTRY)}"
                            " or pass loss_fn" + (f"; did you mean {hint!r}?" if hint else ""))
        if self.batch_sampler is not None and self.batch_sampler not in BATCH_SAMPLERS:
            hint = closest(self.batch_sampler, BATCH_SAMPLERS)
            problems.append(f"batch_sampler: Unknown batch_sampler {self.batch_sampler!r}; choose from "
                            f"{', '.join(BATCH_SAMPLERS)} (or None for the loss's usual one)"
                            + (f"; did you mean {hint!r}?" if hint else ""))
        if not self.text_column:
            problems.append("text_column: must name a field")
        if not self.label_column:
            problems.append("label_column: must name a field")
        return problems


@dataclass(kw_only=True)
class EmbeddingSFTConfig(EmbeddingParams, LoggingParams, ScheduleParams, OptimizerParams):
    """Every parameter of ``embedding_sft()``: upstream's fourteen plus the shared optimizer, schedule and logging
    groups."""

    algorithm_name = "embedding_sft"

    @property
    def effective_batch_size(self) -> int:
        """Texts per optimizer step (one process): what the callback bridge counts samples in."""
        return self.batch_size

    @property
    def custom_loss(self) -> bool:
        return self.loss_fn is not None

    @property
    def pairs(self) -> bool:
        """mnrl without a loss_fn trains on (anchor, positive) pairs built from the labels."""
        return self.loss_type == "mnrl" and not self.custom_loss

    @property
    def sampler(self) -> str:
        """The batch sampler: the given one, else the one upstream picks for the loss."""
        if self.batch_sampler is not None:
            return self.batch_sampler
        if self.pairs:
            return "no_duplicates"
        return "default" if self.custom_loss else "group_by_label"

    @property
    def loss_label(self) -> str:
        """The result's ``loss``: the loss_type, or ``custom (<class>)`` for a loss_fn (as upstream)."""
        return f"custom ({type(self.loss_fn).__name__})" if self.custom_loss else self.loss_type
