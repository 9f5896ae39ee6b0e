"""The data of one SFT-style run, from its config: training set, validation set (file or split), length checks.

``prepare_training_data`` is what the native loop (and the engine adapters) call before loading the model;
``prepare_sft_data`` (``data/prepare.py``) does the validation, tokenization and caching of each file.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from training_hub.data.prepare import prepare_sft_data
from training_hub.data.validate import check_data

COLUMNS = ["input_ids", "labels", "length"]


@dataclass
class TrainingData:
    """The tokenized training (and optional validation) samples and what the run plans with."""

    train: Any  # datasets.Dataset with input_ids, labels (HF convention, not shifted), length
    validation: Any | None
    max_tokens: int
    summary: Any = None


def check_sample_lengths(lengths: Sequence[int], max_tokens_per_gpu: int, what: str = "training") -> None:
    """Raise a ValueError (before any training) if a single sample cannot fit one micro-batch."""
    too_long = [(i, n) for i, n in enumerate(lengths) if n > max_tokens_per_gpu]
    if too_long:
        index, length = max(too_long, key=lambda item: item[1])
        raise ValueError(
            f"{len(too_long)} {what} sample(s) are longer than max_tokens_per_gpu={max_tokens_per_gpu} "
            f"(longest: sample {index} with {length} tokens); a sample cannot be split across micro-batches. "
            f"Raise max_tokens_per_gpu to at least {length}, or lower max_seq_len.")


def prepare_training_data(config: Any, tokenizer: Any, root: Path, verbose: bool = True,
                          cache_dir: Path | None = None) -> TrainingData:
    """Validate and tokenize the training data (and the validation data or split); check every sample fits.

    ``prepare_sft_data`` validates every record before it writes its cache (a cache hit means the same bytes were
    validated before), so a data error leaves ckpt_output_dir untouched; the validation file is checked up front
    so that its errors, too, come before the training data's cache is written. ``cache_dir`` replaces the cache's
    place (``data_output_dir``, else ``root/data_cache``): a plan writes nothing into the output directory.
    """
    kind = "pretraining" if config.is_pretraining else "chat"
    if config.validation_data_path:
        check_data(config.validation_data_path, kind=kind, document_column_name=config.document_column_name)
    cache = Path(cache_dir) if cache_dir is not None else (
        Path(config.data_output_dir) if config.data_output_dir else root / "data_cache")

    def prepare(path: str, name: str):
        return prepare_sft_data(
            path, tokenizer, max_seq_len=config.max_seq_len, is_pretraining=config.is_pretraining,
            block_size=config.block_size, document_column_name=config.document_column_name,
            unmask_messages=config.unmask_messages, truncate_long_samples=config.truncate_long_samples,
            cache_dir=cache / name)

    prepared = prepare(config.data_path, "train")
    if verbose:
        print(prepared.summary.format(), file=sys.stderr)
    train, validation = prepared.dataset, None
    if config.validation_data_path:
        validation = prepare(config.validation_data_path, "validation").dataset
    elif config.validation_split > 0:
        held = math.ceil(len(train) * config.validation_split)  # as datasets' train_test_split rounds
        if held >= len(train):
            raise ValueError(f"validation_split={config.validation_split} of {len(train)} sample(s) leaves no "
                             "training sample; lower validation_split or give validation_data_path")
        split = train.train_test_split(test_size=held, seed=config.seed, shuffle=True)
        train, validation = split["train"], split["test"]
    if len(train) == 0:
        raise ValueError(f"data_path {config.data_path}: no training samples left after preparation")
    max_tokens = config.max_tokens_per_gpu or config.max_seq_len
    check_sample_lengths(train["length"], max_tokens)
    if validation is not None:
        check_sample_lengths(validation["length"], max_tokens, what="validation")
    return TrainingData(train.select_columns(COLUMNS), validation and validation.select_columns(COLUMNS),
                        max_tokens, prepared.summary)
