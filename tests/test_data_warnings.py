"""Data that is valid but likely a mistake gets a warning; data that cannot train gets an error naming the fix."""

from __future__ import annotations

import logging
import math
import warnings

import pytest

from test_data_validate import GOOD, write_lines
from training_hub import sft
from training_hub.config.declare import ParameterError
from training_hub.data import DataValidationError
from training_hub.data.validate import check_data, load_preference_data

USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}


def test_jsonl_holding_a_json_array_gets_the_hint(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('\n[{"messages": []},\n {"messages": []}]\n')
    with pytest.raises(DataValidationError, match=r"d\.jsonl:2: .*looks like a JSON array; name the file \.json"):
        check_data(str(path))


def test_conversations_starting_with_assistant_or_ending_on_user_warn_once_per_file(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [GOOD, {"messages": [ASSISTANT, USER, ASSISTANT]},
                                              {"messages": [USER, ASSISTANT, USER]},
                                              {"messages": [USER, ASSISTANT, USER]}, GOOD])
    with pytest.warns(UserWarning) as caught:
        check_data(str(path))
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    assert "1 conversation(s) start with an assistant turn" in messages[1] or \
        "1 conversation(s) start with an assistant turn" in messages[0]
    assert any("2 conversation(s) end on a user turn" in m and f"{path}:3" in m for m in messages)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_data(str(write_lines(tmp_path / "ok.jsonl", [GOOD] * 3)))


def test_equal_chosen_and_rejected_warn(tmp_path):
    pairs = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "same", "rejected": "same"},
             {"prompt": "q", "chosen": "x", "rejected": "x"}]
    path = write_lines(tmp_path / "p.jsonl", pairs)
    with pytest.warns(UserWarning, match=rf"2 pair\(s\) whose chosen equals rejected.*first at {path}:2"):
        assert len(load_preference_data(str(path))) == 3


def test_a_data_directory_logs_what_it_read_and_skipped(tmp_path, caplog):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    write_lines(folder / "a.jsonl", [GOOD])
    write_lines(folder / "sub" / "b.json", [GOOD])
    (folder / "notes.txt").write_text("x")
    with caplog.at_level(logging.INFO, logger="training_hub.data.sources"):
        check_data(str(folder))
    text = caplog.text
    assert "reading 2 file(s): a.jsonl, sub/b.json" in text and "skipped 1" in text and "notes.txt" in text


def test_every_sample_too_long_names_truncate_long_samples(tiny_model_dir, tmp_path):
    data = write_lines(tmp_path / "d.jsonl", [GOOD] * 4)
    with pytest.raises(ValueError, match=r"every sample \(4\) is longer than max_seq_len=4 \(the longest has \d+ "
                                         r"tokens\).*truncate_long_samples=True"):
        sft(str(tiny_model_dir), str(data), str(tmp_path / "run"), max_seq_len=4, disable_progress_bar=True)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nan_or_infinite_learning_rate_is_a_parameter_error(tmp_path, value):
    with pytest.raises(ParameterError, match="learning_rate: must be"):
        sft("m", "d.jsonl", str(tmp_path / "run"), learning_rate=value)
