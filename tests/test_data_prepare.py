"""prepare_sft_data: length policy, summary, pretraining blocks, sources, and the processed-data cache."""

import json

import pytest

from training_hub.data import DataValidationError, PreparedData, prepare_sft_data


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from training_hub.tiny import make_tiny_model

    return AutoTokenizer.from_pretrained(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


def chat(question, answer, **extra):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], **extra}


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def length_of(tok, record):
    return len(tok.apply_chat_template(record["messages"], tokenize=True, return_dict=False))


RECORDS = [chat("What is 2 plus 3?", "5."), chat("Tell me a story. " * 20, "Once upon a time. " * 20),
           chat("Hi", "Hello!"), chat("Tell me another story. " * 30, "The end."), chat("Why?", "Because.")]


def test_too_long_samples_are_dropped_and_counted(tmp_path, tok):
    lengths = [length_of(tok, r) for r in RECORDS]
    limit = sorted(lengths)[2]  # three samples fit, two are longer
    path = write(tmp_path / "d.jsonl", RECORDS)
    prepared = prepare_sft_data(path, tok, max_seq_len=limit)
    assert isinstance(prepared, PreparedData) and prepared.cache_path is None and not prepared.from_cache
    kept = [n for n in lengths if n <= limit]
    assert [row["length"] for row in prepared.dataset] == kept
    s = prepared.summary
    assert (s.records, s.samples, s.dropped_too_long, s.truncated, s.no_loss_samples) == (5, 3, 2, 0, 0)
    assert s.tokens == sum(kept) and s.loss_tokens == sum(prepared.dataset["num_loss_tokens"])
    assert s.examples["too_long"] == [f"{path}:2", f"{path}:4"]
    assert s.longest_record == max(lengths) and (s.length_min, s.length_max) == (min(kept), max(kept))
    text = s.format()
    assert f"dropped: > max_seq_len={limit}" in text and f"e.g. {path}:2, {path}:4" in text
    assert "length histogram" in text and sum(count for _, _, count in s.histogram) == 3
    assert s.to_dict()["dropped_too_long"] == 2


def test_truncation_keeps_the_prefix_and_drops_samples_left_without_loss(tmp_path, tok):
    records = [RECORDS[1], RECORDS[3], RECORDS[0]]  # long answer; long question with short answer; short
    full = [tok.apply_chat_template(r["messages"], tokenize=True, return_dict=False) for r in records]
    limit = length_of(tok, RECORDS[1]) - 10
    assert length_of(tok, RECORDS[3]) - 10 > limit  # the second sample's whole answer is cut off
    prepared = prepare_sft_data(write(tmp_path / "d.jsonl", records), tok, max_seq_len=limit,
                                truncate_long_samples=True)
    s = prepared.summary
    assert (s.samples, s.truncated, s.no_loss_samples, s.dropped_too_long) == (2, 2, 1, 0)
    first, short = prepared.dataset
    assert first["input_ids"] == full[0][:limit] and first["length"] == limit
    assert first["num_loss_tokens"] == sum(label != -100 for label in first["labels"][1:]) > 0
    assert short["input_ids"] == full[2]
    assert s.examples["no_loss"] == [f"{tmp_path / 'd.jsonl'}:2"]
    assert "dropped: no loss-bearing tokens" in s.format()


def test_pretraining_concatenates_documents_with_eos_into_blocks(tmp_path, tok):
    docs = ["The quick brown fox jumps over the lazy dog.", "Once upon a time there was a village.", "Hi"]
    path = write(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    stream = []
    for doc in docs:
        stream += tok.encode(doc, add_special_tokens=False) + [tok.eos_token_id]
    # One block size leaving a remainder of several tokens (kept as a shorter last block), one leaving a single
    # token (nothing to predict: dropped and counted as a no-loss sample).
    longer = next(b for b in range(4, 16) if len(stream) % b >= 2)
    lone = next(b for b in range(4, 16) if len(stream) % b == 1)
    for block, kept in ((longer, len(stream)), (lone, len(stream) - 1)):
        prepared = prepare_sft_data(path, tok, max_seq_len=16, block_size=block, is_pretraining=True,
                                    document_column_name="text")
        rows = list(prepared.dataset)
        assert [token for row in rows for token in row["input_ids"]] == stream[:kept]
        assert [row["length"] for row in rows] == [block] * (kept // block) + ([kept % block] if kept % block else [])
        assert all(row["labels"] == row["input_ids"] for row in rows)
        assert [row["num_loss_tokens"] for row in rows] == [row["length"] - 1 for row in rows]
        s = prepared.summary
        assert (s.kind, s.records, s.samples, s.tokens, s.block_size) == ("pretraining", 3, len(rows), kept, block)
        assert s.no_loss_samples == len(stream) - kept
        assert s.loss_tokens == kept - len(rows)
        assert f"blocks of {block} tokens" in s.format()


def test_block_size_defaults_to_max_seq_len_and_is_checked(tmp_path, tok):
    path = write(tmp_path / "docs.jsonl", [{"document": "word " * 100}])
    prepared = prepare_sft_data(path, tok, max_seq_len=32, is_pretraining=True)
    assert max(prepared.dataset["length"]) == 32
    with pytest.raises(ValueError, match=r"block_size \(64\) must not exceed max_seq_len \(32\)"):
        prepare_sft_data(path, tok, max_seq_len=32, block_size=64, is_pretraining=True)


def test_invalid_data_fails_before_tokenizing(tmp_path, tok):
    path = write(tmp_path / "d.jsonl", [RECORDS[0], {"messages": [{"role": "user", "content": "no answer"}]}])
    with pytest.raises(DataValidationError, match=r"d\.jsonl:2: messages: no assistant message"):
        prepare_sft_data(path, tok, max_seq_len=64, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataValidationError, match="no such file or directory"):
        prepare_sft_data(str(tmp_path / "missing.jsonl"), tok, max_seq_len=64, cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()


def test_every_source_type_gives_the_same_samples(tmp_path, tok):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = RECORDS[:3]
    expected = prepare_sft_data(write(tmp_path / "d.jsonl", records), tok, max_seq_len=512).dataset.to_list()
    (tmp_path / "list.json").write_text(json.dumps(records, indent=1))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    (tmp_path / "dir").mkdir()
    write(tmp_path / "dir" / "a.jsonl", records[:1])
    write(tmp_path / "dir" / "b.jsonl", records[1:])
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    for source in ("list.json", "d.parquet", "dir", "saved"):
        got = prepare_sft_data(str(tmp_path / source), tok, max_seq_len=512).dataset.to_list()
        assert got == expected, source


def test_cache_is_reused_until_data_tokenizer_or_parameters_change(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    write(path, RECORDS)
    cache = str(tmp_path / "cache")
    first = prepare_sft_data(str(path), tok, max_seq_len=512, cache_dir=cache)
    assert not first.from_cache and first.cache_path.startswith(cache)
    second = prepare_sft_data(str(path), tok, max_seq_len=512, cache_dir=cache)
    assert second.from_cache and second.cache_path == first.cache_path
    assert second.dataset.to_list() == first.dataset.to_list()
    assert second.summary == first.summary

    changed_param = prepare_sft_data(str(path), tok, max_seq_len=256, cache_dir=cache)
    assert not changed_param.from_cache and changed_param.cache_path != first.cache_path
    assert not prepare_sft_data(str(path), tok, max_seq_len=512, unmask_messages=True, cache_dir=cache).from_cache

    write(path, RECORDS[:4])
    changed_data = prepare_sft_data(str(path), tok, max_seq_len=512, cache_dir=cache)
    assert not changed_data.from_cache and changed_data.summary.records == 4

    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(tok.name_or_path)
    other.chat_template = tok.chat_template.replace("<|im_end|>\\n", "<|im_end|>\\n\\n")
    assert other.chat_template != tok.chat_template
    assert not prepare_sft_data(str(path), other, max_seq_len=512, cache_dir=cache).from_cache
    assert prepare_sft_data(str(path), tok, max_seq_len=512, cache_dir=cache).from_cache
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(entries) == 5 and not any(name.startswith(".") for name in entries)  # no temporary leftovers


def test_bad_parameters_are_value_errors(tmp_path, tok):
    path = write(tmp_path / "d.jsonl", RECORDS[:1])
    with pytest.raises(ValueError, match="max_seq_len must be an int >= 2"):
        prepare_sft_data(path, tok, max_seq_len=0)
    with pytest.raises(ValueError, match="block_size is only used with is_pretraining=True"):
        prepare_sft_data(path, tok, max_seq_len=64, block_size=32)


def test_num_proc_gives_the_same_result(tmp_path, tok):
    path = write(tmp_path / "d.jsonl", RECORDS * 4)
    single = prepare_sft_data(path, tok, max_seq_len=256)
    double = prepare_sft_data(path, tok, max_seq_len=256, num_proc=2)
    assert double.dataset.to_list() == single.dataset.to_list() and double.summary == single.summary


def test_chat_data_needs_a_chat_template(tmp_path, tok):
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(tok.name_or_path)
    bare.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        prepare_sft_data(write(tmp_path / "d.jsonl", RECORDS[:1]), bare, max_seq_len=64)
