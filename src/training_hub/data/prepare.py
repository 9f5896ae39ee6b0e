"""From a data path and a tokenizer to a tokenized, masked, length-checked and cached ``datasets.Dataset``.

Order of work: look up the cache (a hit returns at once: the same bytes were validated when the entry was
written), validate every record (``read_records``, the same checks as ``check_data``), tokenize with
``datasets.map`` in batches, apply the length policy, summarize, write the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training_hub.data.errors import DataProblem, DataValidationError
from training_hub.data.sources import find_files, fingerprint
from training_hub.data.summary import DataSummary, length_histogram
from training_hub.data.tokenize import (
    KEEP, NO_LOSS, TOO_LONG, ChatRenderer, backend_tokenizer, tokenize_chats, tokenize_documents,
)
from training_hub.data.validate import Records, read_records
from training_hub.fsutil import atomic_directory

CACHE_VERSION = "training-hub-data-1"  # change when processing changes its output
BATCH_SIZE = 1000
COLUMNS = ("input_ids", "labels", "num_loss_tokens", "length")


@dataclass
class PreparedData:
    """Tokenized training data.

    ``dataset`` columns: ``input_ids`` (list of int), ``labels`` (same length; -100 where no loss; not shifted:
    ``labels[i] == input_ids[i]`` where the token at ``i`` is trained), ``num_loss_tokens`` (labels[1:] that are
    not -100, i.e. the tokens that get loss after the shift), ``length`` (number of tokens).
    """

    dataset: Any
    summary: DataSummary
    cache_path: str | None = None
    from_cache: bool = False


def _check_params(max_seq_len, block_size, is_pretraining) -> None:
    problems = []
    if not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool) or max_seq_len < 2:
        problems.append(f"max_seq_len must be an int >= 2, got {max_seq_len!r}")
    if block_size is not None:
        if not is_pretraining:
            problems.append("block_size is only used with is_pretraining=True")
        elif not isinstance(block_size, int) or block_size < 2:
            problems.append(f"block_size must be an int >= 2, got {block_size!r}")
        elif isinstance(max_seq_len, int) and block_size > max_seq_len:
            problems.append(f"block_size ({block_size}) must not exceed max_seq_len ({max_seq_len})")
    if problems:
        raise ValueError("prepare_sft_data: " + "; ".join(problems))


def prepare_sft_data(data_path: str, tokenizer, *, max_seq_len: int, is_pretraining: bool = False,
                     block_size: int | None = None, document_column_name: str = "document",
                     unmask_messages: bool = False, truncate_long_samples: bool = False,
                     cache_dir: str | None = None, num_proc: int | None = None) -> PreparedData:
    """Validate, tokenize (exact loss masks), apply the length policy, summarize and cache ``data_path``.

    Chat data (messages or alpaca records): loss on assistant turns and their end-of-turn token; ``unmask``
    per record or ``unmask_messages=True`` puts loss on everything but the system prompt. Samples longer than
    ``max_seq_len`` are dropped (or cut when ``truncate_long_samples``); samples without loss tokens are dropped;
    both are counted in the summary. With ``is_pretraining``, documents (``document_column_name``) are
    tokenized, each followed by EOS, concatenated and cut into ``block_size`` blocks (default ``max_seq_len``).
    With ``cache_dir`` the result is stored under a hash of the data bytes, the tokenizer and the parameters,
    and reused while none of them change. ``num_proc`` > 1 tokenizes in that many processes (pays off only for
    large data on machines with more than two cores).
    """
    _check_params(max_seq_len, block_size, is_pretraining)
    kind = "pretraining" if is_pretraining else "chat"
    params = {"kind": kind, "max_seq_len": max_seq_len, "block_size": block_size or max_seq_len,
              "document_column_name": document_column_name if is_pretraining else None,
              "unmask_messages": unmask_messages, "truncate_long_samples": truncate_long_samples}
    cache_path = None
    if cache_dir is not None:
        _, problem = find_files(str(data_path))
        if problem is not None:
            raise DataValidationError([problem])
        cache_path = Path(cache_dir) / f"sft-{cache_key(str(data_path), tokenizer, params)[:24]}"
        if (cache_path / "summary.json").is_file():
            return _load_cached(cache_path)
    records = read_records(str(data_path), kind=kind, document_column_name=document_column_name)
    if is_pretraining:
        dataset, summary = _pretraining(records, tokenizer, str(data_path), max_seq_len, block_size or max_seq_len)
    else:
        dataset, summary = _chat(records, tokenizer, str(data_path), max_seq_len, unmask_messages,
                                 truncate_long_samples, num_proc)
    if cache_path is not None:
        _save_cached(cache_path, dataset, summary)
    return PreparedData(dataset, summary, str(cache_path) if cache_path else None, False)


def _features():
    import datasets

    ids = datasets.Sequence(datasets.Value("int32"))
    return datasets.Features({"input_ids": ids, "labels": ids, "num_loss_tokens": datasets.Value("int32"),
                              "length": datasets.Value("int32"), "status": datasets.Value("int8"),
                              "truncated": datasets.Value("bool")})


def _chat(records: Records, tokenizer, data_path, max_seq_len, unmask_all, truncate, num_proc):
    import datasets

    render, backend = ChatRenderer(tokenizer), backend_tokenizer(tokenizer)
    conversations = [r["messages"] for r in records.items]
    unmask = [unmask_all or r["unmask"] for r in records.items]
    # The map runs over record indices and reads the validated Python records directly: converting nested
    # messages to Arrow and back would cost more than the rendering.
    source = datasets.Dataset.from_dict({"index": list(range(len(conversations)))})

    def process(batch):
        indices = batch["index"]
        results, failures = tokenize_chats([conversations[i] for i in indices], [unmask[i] for i in indices],
                                           render, backend, max_seq_len=max_seq_len, truncate=truncate)
        if failures:
            raise DataValidationError([
                DataProblem(*records.locations[indices[i]], "messages", f"chat template: {message}",
                            "a conversation the tokenizer's chat template accepts")
                for i, message in failures[:20]], truncated=len(failures) > 20)
        return {key: [r[key] for r in results] for key in (*COLUMNS, "status", "truncated")}

    tokenized = source.map(process, batched=True, batch_size=BATCH_SIZE,
                           remove_columns=source.column_names, features=_features(),
                           num_proc=num_proc if num_proc and num_proc > 1 else None,
                           new_fingerprint=os.urandom(8).hex(), desc="Tokenizing chats")
    return _apply_policy(tokenized, records, data_path, max_seq_len)


def _apply_policy(tokenized, records: Records, data_path, max_seq_len):
    """Drop the samples marked too long or without loss, and count everything for the summary."""
    import numpy as np

    table = tokenized.data
    status = table.column("status").to_numpy()
    lengths = table.column("length").to_numpy()
    keep = np.flatnonzero(status == KEEP)
    if len(status) and bool((status == TOO_LONG).all()):
        raise ValueError(f"{data_path}: every sample ({len(status)}) is longer than max_seq_len={max_seq_len} "
                         f"(the longest has {int(lengths.max())} tokens): raise max_seq_len, or pass "
                         "truncate_long_samples=True to cut them to max_seq_len")
    truncated = table.column("truncated").to_numpy(zero_copy_only=False)
    examples = {}
    for reason, where in (("too_long", status == TOO_LONG), ("no_loss", status == NO_LOSS),
                          ("truncated", truncated)):
        examples[reason] = [records.where(int(i)) for i in np.flatnonzero(where)[:5]]
    dataset = tokenized.remove_columns(["status", "truncated"])
    if len(keep) < len(dataset):
        dataset = dataset.select(keep).flatten_indices()
    kept = lengths[keep]
    summary = DataSummary(
        kind="chat", data_path=data_path, records=len(records.items), samples=len(keep),
        tokens=int(kept.sum()), loss_tokens=int(table.column("num_loss_tokens").to_numpy()[keep].sum()),
        max_seq_len=max_seq_len, dropped_too_long=int((status == TOO_LONG).sum()),
        truncated=int(truncated.sum()), no_loss_samples=int((status == NO_LOSS).sum()),
        longest_record=int(lengths.max()) if len(lengths) else 0, **_length_stats(kept, max_seq_len),
        examples={k: v for k, v in examples.items() if v})
    return dataset, summary


def _length_stats(lengths, max_seq_len) -> dict:
    if not len(lengths):
        return {"histogram": length_histogram(lengths, max_seq_len)}
    return {"length_min": int(lengths.min()), "length_mean": round(float(lengths.mean()), 2),
            "length_max": int(lengths.max()), "histogram": length_histogram(lengths, max_seq_len)}


def _pretraining(records: Records, tokenizer, data_path, max_seq_len, block_size):
    """Tokenize documents, append EOS to each, concatenate, cut into ``block_size`` blocks (all tokens trained).

    The last block holds the remainder and is shorter; a 1-token remainder has nothing to predict and is
    counted as a no-loss sample.
    """
    import datasets
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    model = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if tokenizer.eos_token_id is None:
        raise ValueError(f"is_pretraining=True: the tokenizer of {model} has no EOS token (eos_token in "
                         "tokenizer_config.json), which pretraining appends to each document to separate them; "
                         "set one (tokenizer.eos_token = ...) or use a model whose tokenizer has one")
    if len(tokenizer) <= len(getattr(tokenizer, "all_special_ids", ())):
        raise ValueError(f"is_pretraining=True: the tokenizer of {model} has an empty vocabulary "
                         f"({len(tokenizer)} tokens, all special); every document would become its EOS alone")
    backend, eos_id = backend_tokenizer(tokenizer), int(tokenizer.eos_token_id)
    source = datasets.Dataset.from_dict({"document": records.items})
    tokenized = source.map(lambda batch: {"ids": tokenize_documents(batch["document"], backend, eos_id)},
                           batched=True, batch_size=BATCH_SIZE, remove_columns=["document"],
                           features=datasets.Features({"ids": datasets.Sequence(datasets.Value("int32"))}),
                           new_fingerprint=os.urandom(8).hex(), desc="Tokenizing documents")
    flat = pc.list_flatten(tokenized.data.column("ids")).combine_chunks()
    total = len(flat)
    if total == len(records.items) and any(str(d).strip() for d in records.items):
        raise ValueError(f"is_pretraining=True: the tokenizer of {model} turns every document of {data_path} into "
                         "no tokens (an empty or broken vocabulary); each would train on its EOS alone")
    offsets = np.append(np.arange(0, total, block_size), total).astype(np.int32)
    lengths = np.diff(offsets)
    if len(lengths) and lengths[-1] < 2:  # a lone last token: nothing to predict
        offsets, lengths = offsets[:-1], lengths[:-1]
    blocks = pa.ListArray.from_arrays(pa.array(offsets), flat)
    table = pa.table({"input_ids": blocks, "labels": blocks, "num_loss_tokens": pa.array(lengths - 1),
                      "length": pa.array(lengths)})
    dataset = datasets.Dataset(datasets.table.InMemoryTable(table))
    lone_token = int(total - int(lengths.sum()))  # 0 or 1
    summary = DataSummary(
        kind="pretraining", data_path=data_path, records=len(records.items), samples=len(lengths),
        tokens=int(lengths.sum()), loss_tokens=int((lengths - 1).sum()), max_seq_len=max_seq_len,
        no_loss_samples=lone_token, block_size=block_size,
        **_length_stats(lengths, max_seq_len))
    return dataset, summary


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides the tokens: the Rust tokenizer (vocab, merges, added tokens), template, specials."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    digest.update(backend_tokenizer(tokenizer).to_str().encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    digest.update((getattr(tokenizer, "chat_template", None) or "").__repr__().encode())
    return digest.hexdigest()


def cache_key(data_path: str, tokenizer, params: dict) -> str:
    """sha256 of the cache version, the data bytes, the tokenizer fingerprint and the processing parameters."""
    digest = hashlib.sha256(CACHE_VERSION.encode())
    for part in (fingerprint(data_path), tokenizer_fingerprint(tokenizer), json.dumps(params, sort_keys=True)):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()


def _save_cached(path: Path, dataset, summary: DataSummary) -> None:
    """Write dataset and summary under a temporary name, then rename: a cache entry is complete or absent (when
    another process finished first, its entry is equivalent and is kept)."""
    with atomic_directory(path, prefix=f".{path.name}.tmp-", existing="keep") as tmp:
        dataset.save_to_disk(str(tmp / "dataset"))
        (tmp / "summary.json").write_text(json.dumps(summary.to_dict(), indent=1))


def _load_cached(path: Path) -> PreparedData:
    import datasets

    summary = DataSummary(**json.loads((path / "summary.json").read_text()))
    dataset = datasets.load_from_disk(str(path / "dataset"))
    return PreparedData(dataset, summary, str(path), True)
