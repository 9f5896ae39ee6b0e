"""A broken local model directory fails at once, naming the real cause, before any data work or output dir."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from test_data_validate import GOOD, write_lines
from training_hub import dpo, sft
from training_hub.data.model_dir import ModelDirectoryError, check_model_dir


@pytest.fixture
def model(tiny_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    return copy


@pytest.fixture
def data(tmp_path):
    return write_lines(tmp_path / "d.jsonl", [GOOD] * 4)


def fails_fast(call, model_path, data, out, match, **kwargs):
    started = time.monotonic()
    with pytest.raises(ModelDirectoryError, match=match) as info:
        call(str(model_path), str(data), str(out), max_seq_len=128, disable_progress_bar=True, **kwargs)
    assert time.monotonic() - started < 5, "a broken model directory must fail before any slow work"
    assert isinstance(info.value, ValueError)
    assert not out.exists(), "a broken model directory must not create ckpt_output_dir"
    return str(info.value)


def truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep])


BREAKS = {
    "missing": (lambda m: shutil.rmtree(m), "no such directory"),
    "file": (lambda m: (shutil.rmtree(m), m.write_text("x")), "is a file, not a model directory"),
    "no_config": (lambda m: (m / "config.json").unlink(), "no config.json"),
    "no_tokenizer": (lambda m: ((m / "tokenizer.json").unlink(), (m / "tokenizer_config.json").unlink()),
                     "no tokenizer files"),
    "no_weights": (lambda m: (m / "model.safetensors").unlink(), r"no weights \(\*\.safetensors"),
    "truncated": (lambda m: truncate(m / "model.safetensors", 100_000), "model.safetensors is truncated"),
    "truncated_header": (lambda m: truncate(m / "model.safetensors", 20), "model.safetensors is truncated"),
    "tiny_file": (lambda m: truncate(m / "model.safetensors", 3), "model.safetensors is truncated"),
    "missing_shard": (lambda m: ((m / "model.safetensors").rename(m / "model-00001-of-00002.safetensors"),
                                 (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
                          "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))),
                      "missing shard.*model-00002-of-00002.safetensors"),
    "no_chat_template": (lambda m: (m / "chat_template.jinja").unlink(), "no chat template"),
}


@pytest.mark.parametrize("case", list(BREAKS))
def test_broken_model_dir_fails_fast_from_sft(model, data, tmp_path, case, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # a missing local path must not try the network
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    breaker, match = BREAKS[case]
    breaker(model)
    message = fails_fast(sft, model, data, tmp_path / "run", match)
    assert str(model) in message


def test_broken_model_dir_fails_fast_from_dpo(model, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    pairs = write_lines(tmp_path / "p.jsonl", [{"prompt": "Q: 1+1?\nA: ", "chosen": "2", "rejected": "3"}] * 4)
    truncate(model / "model.safetensors", 1000)
    fails_fast(dpo, model, pairs, tmp_path / "run", "model.safetensors is truncated", backend="native")


def test_relative_missing_path_and_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelDirectoryError, match="no such directory"):
        check_model_dir("./nope", need_chat_template=True, trust_remote_code=False)
    with pytest.raises(ModelDirectoryError, match="no such directory"):
        check_model_dir("a/b/c", need_chat_template=True, trust_remote_code=False)
    for hub in ("Qwen/Qwen2.5-0.5B", "gpt2"):  # left to transformers (the HF cache may have it)
        check_model_dir(hub, need_chat_template=True, trust_remote_code=False)


def test_valid_model_dir_passes(tiny_model_dir):
    check_model_dir(str(tiny_model_dir), need_chat_template=True, trust_remote_code=False)


DOCS = [{"document": f"Document number {i} says something."} for i in range(30)]


def test_pretraining_without_eos_is_an_error(model, tmp_path):
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["eos_token"] = None  # (absent, transformers falls back to <|endoftext|>)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    docs = write_lines(tmp_path / "docs.jsonl", DOCS)
    with pytest.raises(ValueError, match=r"tokenizer of .*model has no EOS token"):
        sft(str(model), str(docs), str(tmp_path / "run"), is_pretraining=True, max_seq_len=64)
    assert not (tmp_path / "run").exists()


def test_pretraining_with_an_empty_vocabulary_is_an_error(model, tmp_path):
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"], tokenizer["model"]["merges"] = {}, []
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    docs = write_lines(tmp_path / "docs.jsonl", DOCS)
    with pytest.raises(ValueError, match=r"tokenizer of .*model (has an empty vocabulary|turns every document)"):
        sft(str(model), str(docs), str(tmp_path / "run"), is_pretraining=True, max_seq_len=64)
    assert not (tmp_path / "run").exists()
