"""Bad data fails from sft()/osft() itself, naming the file and line, and leaves ckpt_output_dir untouched."""

from __future__ import annotations

import json

import pytest

from test_data_validate import MALFORMED, GOOD, write_lines
from training_hub import osft, sft
from training_hub.data import DataValidationError


@pytest.mark.parametrize("name,bad,field,words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_line_fails_from_sft_before_anything_is_written(tiny_model_dir, tmp_path, name, bad, field, words):
    data = write_lines(tmp_path / f"{name}.jsonl", [GOOD, GOOD, bad, GOOD])
    out = tmp_path / "run"
    with pytest.raises(DataValidationError) as info:
        sft(str(tiny_model_dir), str(data), str(out), max_seq_len=128, disable_progress_bar=True)
    assert f"{data}:3: {field}" in str(info.value)
    assert words in str(info.value)
    assert not out.exists(), "a failed data check must not create ckpt_output_dir"


def test_validation_data_is_checked_too_and_osft_fails_the_same_way(tiny_model_dir, tmp_path):
    train = write_lines(tmp_path / "train.jsonl", [GOOD] * 4)
    val = write_lines(tmp_path / "val.jsonl", [GOOD, {"messages": [{"role": "user", "content": "only a question"}]}])
    out = tmp_path / "run"
    with pytest.raises(DataValidationError, match=r"val\.jsonl:2: messages: .*assistant"):
        sft(str(tiny_model_dir), str(train), str(out), validation_data_path=str(val), max_seq_len=128)
    assert not out.exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe not utf-8\n")
    with pytest.raises(DataValidationError, match=r"bad\.jsonl:2"):
        osft(str(tiny_model_dir), str(bad), str(out), unfreeze_rank_ratio=0.5, max_seq_len=128)
    assert not out.exists()


def test_missing_and_empty_data_paths(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DataValidationError, match="nope.jsonl"):
        sft(str(tiny_model_dir), str(tmp_path / "nope.jsonl"), str(out))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataValidationError, match="empty.jsonl"):
        sft(str(tiny_model_dir), str(tmp_path / "empty.jsonl"), str(out))
    assert not out.exists()
