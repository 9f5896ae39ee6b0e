"""Cases a new user met that used to end badly or vaguely (an adversarial pass over the landed code)."""

from __future__ import annotations

import json
import warnings

import pytest

from training_hub import dpo, sft
from training_hub.cli import main


def test_a_hub_id_that_is_not_cached_fails_at_once_offline(monkeypatch, tmp_path):
    from training_hub.data.model_dir import ModelDirectoryError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelDirectoryError, match="not in the Hugging Face cache while offline"):
        sft("some-org/not-cached-model", str(tmp_path / "d.jsonl"), str(tmp_path / "out"))


def test_an_output_path_that_is_a_file_is_named(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    target = tmp_path / "afile.txt"
    target.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="ckpt_output_dir .*afile.txt is a file"):
        sft(str(tiny_model_dir), str(data), str(target), max_seq_len=64)


def test_chat_data_given_to_dpo_says_so_once(tiny_model_dir, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": "a"}]}) + "\n"
                            for i in range(5)))
    with pytest.raises(ValueError, match="this file holds chat data .* for chat data use sft\\(\\)") as info:
        dpo(str(tiny_model_dir), str(data), str(tmp_path / "out"))
    assert "missing \"prompt\"" not in str(info.value) and str(info.value).count("chat.jsonl:") == 1


def test_pairs_that_are_all_identical_are_refused(tiny_model_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "a"}) + "\n" for i in range(4)))
    with pytest.raises(ValueError, match="every pair's chosen equals its rejected"):
        dpo(str(tiny_model_dir), str(data), str(tmp_path / "out"))


def test_skipped_files_in_a_data_directory_are_announced(tmp_path):
    from training_hub.data import check_data

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                                             {"role": "assistant", "content": "a"}]}) + "\n")
    (folder / "notes.txt").write_text("readme")
    with pytest.warns(UserWarning, match=r"skipped 1 file\(s\) that are not .jsonl/.json/.parquet/.csv: notes.txt"):
        check_data(str(folder))


def test_a_backend_that_cannot_run_here_is_one_line_in_the_cli(capsys, tiny_model_dir, tmp_path):
    code = main(["train", "sft", "--backend", "instructlab-training", "--model-path", str(tiny_model_dir),
                 "--data-path", str(tmp_path / "d.jsonl"), "--ckpt-output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    if "cannot run here" not in err:  # the engine is installed and CUDA is present: nothing to check here
        pytest.skip("instructlab-training can run on this machine")
    assert code == 1 and err.startswith("error: ") and "Traceback" not in err and "native" in err


def test_a_directory_with_checkpoints_but_no_state_does_not_advise_resume(tiny_model_dir, tmp_path):
    from training_hub.engine.checkpoint import ExistingRunError, check_output_dir

    (tmp_path / "hf_format" / "samples_8").mkdir(parents=True)
    with pytest.raises(ExistingRunError) as info:
        check_output_dir(tmp_path, resume=False)
    assert "no training state to resume from" in str(info.value) and "Pass resume=True" not in str(info.value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_output_dir(tmp_path / "empty", resume=True) is None  # a warning via logging, not warnings
