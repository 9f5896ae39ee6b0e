"""Embedding fine-tuning: contrastive training of a sentence-embedding model so that same-label texts cluster.

For semantic routing and other embedding classifiers (upstream Training Hub 0.10+ ``embedding_sft()``, same names,
defaults and result keys). The parameters are declared once in :mod:`training_hub.config.embedding`; the training is
sentence-transformers' (:mod:`training_hub.backends.sentence_transformers`); the data reading is
:mod:`training_hub.data.labelled`. Upstream's module-level helpers keep their names here.

    from training_hub import embedding_sft

    result = embedding_sft("sentence-transformers/all-MiniLM-L6-v2", "routes.jsonl", "./router",
                           loss_type="batch_all_triplet", num_epochs=20, batch_size=32)
    result["model_path"]  # SentenceTransformer(result["model_path"]) loads the fine-tuned model
"""

from __future__ import annotations

from typing import Any

from training_hub.algorithms.base import DeclaredAlgorithm, convenience_function
from training_hub.backends.sentence_transformers import SentenceTransformersBackend, label_metrics
from training_hub.config.declare import param_specs
from training_hub.config.embedding import (
    BATCH_SAMPLERS, LOSS_REGISTRY, TRIPLET_LOSSES, EmbeddingParams, EmbeddingSFTConfig,
)

__all__ = ["BATCH_SAMPLERS", "LOSS_REGISTRY", "TRIPLET_LOSSES", "EmbeddingParams", "EmbeddingSFTAlgorithm",
           "EmbeddingSFTConfig", "SentenceTransformersBackend", "embedding_sft", "label_metrics"]

# Every parameter name embedding_sft() takes (upstream's name for it).
_KNOWN_PARAMS: frozenset[str] = frozenset(param_specs(EmbeddingSFTConfig))


class EmbeddingSFTAlgorithm(DeclaredAlgorithm):
    """Contrastive fine-tuning of a sentence-embedding model on labelled texts."""

    name = "embedding_sft"
    config_class = EmbeddingSFTConfig
    backend_preference = ("sentence-transformers",)


embedding_sft = convenience_function(
    EmbeddingSFTAlgorithm, "Fine-tune a sentence-embedding model so that texts with the same label cluster "
                           "(triplet or ranking losses, on sentence-transformers). The result has status, "
                           "model_path, num_samples, num_epochs and loss, as upstream's.")


def _load_dataset(data_path: str, text_column: str = "text", label_column: str = "label", *,
                  require_text: bool = True, require_label: bool = True) -> Any:
    """Upstream's helper: labelled texts as a ``datasets.Dataset`` with ``text``/``label`` columns (renamed from
    ``text_column``/``label_column``), labels made integers; a null label stays ``None`` here (training refuses
    it). Problems raise one ``ValueError`` naming each file and line."""
    from training_hub.data.labelled import read_labelled

    return read_labelled(data_path, text_column, label_column, require_text=require_text,
                         require_label=require_label, strict=False).dataset()


def _to_pair_dataset(dataset: Any, max_pairs_per_label: int = 10_000, seed: int = 42) -> Any:
    """Upstream's helper: (anchor, positive) pairs of same-label texts for MNRL, at most ``max_pairs_per_label``
    per label (<= 0: no cap)."""
    from datasets import Dataset

    from training_hub.data.labelled import to_pairs

    return Dataset.from_list(to_pairs(list(dataset), max_pairs_per_label=max_pairs_per_label, seed=seed))
