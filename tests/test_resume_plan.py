"""resume=True continues the same run: same data, same settings, unless a change is asked for explicitly."""

from __future__ import annotations

import json

import pytest

from training_hub import sft
from training_hub.engine.checkpoint import ExistingRunError

COMMON = dict(effective_batch_size=8, max_seq_len=128, learning_rate=1e-3, lr_scheduler="cosine",
              disable_progress_bar=True, dtype="float32")


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    from test_engine_train import write_chat

    return write_chat(tmp_path_factory.mktemp("data") / "chat.jsonl")  # 48 samples: 6 steps of 8


def run(model, data, out, **kw):
    return sft(str(model), str(data), str(out), **{**COMMON, **kw})


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_refuses_different_data_and_settings(tiny_model_dir, chat_data, tmp_path):
    out = tmp_path / "run"
    run(tiny_model_dir, chat_data, out, max_steps=2)
    other = tmp_path / "other.jsonl"
    lines = chat_data.read_text().splitlines()
    other.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # the same records, another order: other content
    with pytest.raises(ValueError, match="the training data's content changed"):
        run(tiny_model_dir, other, out, max_steps=2, resume=True)
    with pytest.raises(ValueError, match=r"learning_rate: saved 0\.001, now 0\.002.*resume_changes=\['learning_rate'\]"):
        run(tiny_model_dir, chat_data, out, max_steps=2, resume=True, learning_rate=2e-3)
    with pytest.raises(ValueError, match=r"weight_decay: saved 0\.0, now 0\.1\. Otherwise"):  # not changeable
        run(tiny_model_dir, chat_data, out, max_steps=2, resume=True, weight_decay=0.1)
    assert [r["step"] for r in records(out)] == [1, 2]  # nothing was touched by the refused resumes


def test_asked_changes_are_applied_and_the_schedule_continues(tiny_model_dir, chat_data, tmp_path):
    out = tmp_path / "run"
    run(tiny_model_dir, chat_data, out, max_steps=3, lr_scheduler="constant")
    done = run(tiny_model_dir, chat_data, out, max_steps=6, resume=True, lr_scheduler="constant",
               learning_rate=5e-4, resume_changes=["max_steps", "learning_rate"])
    assert done.metrics["steps"] == 6
    lrs = [r["lr"] for r in records(out)]
    assert lrs == pytest.approx([1e-3] * 3 + [5e-4] * 3)  # never a step at lr 0; the new rate from step 4


def test_resume_without_a_state_never_adopts_another_run(tiny_model_dir, chat_data, tmp_path):
    out = tmp_path / "run"
    run(tiny_model_dir, chat_data, out, max_steps=1)
    for state in (out / "state").iterdir():  # a run that kept checkpoints but no training state
        __import__("shutil").rmtree(state)
    with pytest.raises(ExistingRunError, match="no complete training state"):
        run(tiny_model_dir, chat_data, out, max_steps=2, resume=True)
    assert sorted(p.name for p in (out / "hf_format").iterdir()) == ["samples_8"]


def test_resume_changes_is_checked():
    from training_hub import ParameterError

    with pytest.raises(ParameterError, match="resume_changes: seed cannot change on resume"):
        sft("m", "d.jsonl", "o", resume=True, resume_changes=["seed"])
    with pytest.raises(ParameterError, match="resume_changes: only means something with resume=True"):
        sft("m", "d.jsonl", "o", resume_changes=["learning_rate"])


def test_settings_that_cannot_work_as_meant_are_named_before_training(tiny_model_dir, chat_data, tmp_path, caplog):
    import logging

    with pytest.raises(ValueError, match=r"validation_split=0\.99 of 48 sample\(s\) leaves no training sample"):
        run(tiny_model_dir, chat_data, tmp_path / "a", validation_split=0.99)
    with caplog.at_level(logging.WARNING, logger="training_hub"):
        run(tiny_model_dir, chat_data, tmp_path / "b", effective_batch_size=64, warmup_steps=5, num_epochs=1)
    text = caplog.text
    assert "warmup_steps=5 is not below the run's 1 optimizer steps" in text
    assert "effective_batch_size=64 is larger than the 48 training samples" in text


def test_trl_resume_refuses_different_data_and_settings(tiny_model_dir, chat_data, tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "trl"
    trl = dict(backend="trl", max_tokens_per_gpu=8 * 128, save_samples=8)
    run(tiny_model_dir, chat_data, out, max_steps=1, **trl)
    assert json.loads((out / "trl_state" / "run_plan.json").read_text())["backend"] == "trl"
    other = tmp_path / "other.jsonl"
    lines = chat_data.read_text().splitlines()
    other.write_text("\n".join(lines[1:] + lines[:1]) + "\n")
    with pytest.raises(ValueError, match="the training data's content changed"):
        run(tiny_model_dir, other, out, max_steps=1, resume=True, **trl)
    with pytest.raises(ValueError, match=r"learning_rate: saved 0\.001, now 0\.002") as info:
        run(tiny_model_dir, chat_data, out, max_steps=1, resume=True, learning_rate=2e-3, **trl)
    assert "resume_changes" not in str(info.value)  # trl cannot apply them, so it does not suggest them
    with pytest.raises(ValueError, match="resume_changes: the trl backend continues a run exactly as saved"):
        run(tiny_model_dir, chat_data, out, max_steps=1, resume=True, learning_rate=2e-3,
            resume_changes=["learning_rate"], **trl)
    result = run(tiny_model_dir, chat_data, out, max_steps=1, resume=True, **trl)  # the same run: it continues
    assert result.status == "success"
