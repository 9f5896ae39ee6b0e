"""How a run ends when it cannot go on: divergence, Ctrl-C and SIGTERM (engine/run.py)."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from training_hub import sft
from training_hub.engine import metrics
from training_hub.engine.run import TrainingDivergedError

@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    from test_engine_train import write_chat

    return write_chat(tmp_path_factory.mktemp("data") / "chat.jsonl")  # 48 samples: 6 steps of 8


COMMON = dict(num_epochs=1, effective_batch_size=8, max_seq_len=128, learning_rate=1e-3, lr_scheduler="constant", disable_progress_bar=True,
              save_final_checkpoint=True)


def test_a_non_finite_loss_stops_the_run_and_nothing_of_it_is_saved(tiny_model_dir, chat_data, tmp_path,
                                                                    monkeypatch):
    from training_hub.engine import loss as loss_module

    real = loss_module.token_loss_sum
    calls = {"n": 0}

    def poisoned(model, row, *rest):  # steps 1-2 are fine; the first micro-batch of step 3 gives NaN
        calls["n"] += 1
        value = real(model, row, *rest)
        return value * float("nan") if calls["n"] > 2 else value

    monkeypatch.setattr(loss_module, "token_loss_sum", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match=r"diverged at step 3: loss nan.*learning rate 0\.001.*"
                                                    r"samples_16") as info:
        sft(str(tiny_model_dir), str(chat_data), str(out), save_samples=16, max_tokens_per_gpu=4096, **COMMON)
    assert isinstance(info.value, RuntimeError)
    names = sorted(p.name for p in (out / "hf_format").iterdir())
    assert names == ["samples_16"]  # the good checkpoint; no NaN checkpoint was written
    from safetensors.torch import load_file

    weights = load_file(str(out / "hf_format" / "samples_16" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # strict JSON: json.loads would accept NaN, so check the text
    assert "NaN" not in "".join(lines) and "Infinity" not in "".join(lines)
    assert records[-1]["step"] == 3 and records[-1]["loss"] is None and records[-1]["diverged"] is True


def test_metrics_jsonl_is_strict_json(tmp_path):
    writer = metrics.MetricsWriter(tmp_path / "m.jsonl")
    writer.write({"step": 1, "loss": float("inf"), "grad_norm": float("nan"), "lr": 1e-3})
    writer.close()
    text = (tmp_path / "m.jsonl").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}")) == {
        "step": 1, "loss": None, "grad_norm": None, "lr": 1e-3}


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_save_the_state_and_the_cli_exits_non_zero(tiny_model_dir, chat_data, tmp_path,
                                                                      monkeypatch, capsys, signum, code):
    from training_hub.cli import main

    real_write = metrics.MetricsWriter.write

    def write(self, record):  # the signal arrives while step 2 is being logged
        real_write(self, record)
        if record.get("step") == 2:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(metrics.MetricsWriter, "write", write)
    out = tmp_path / "run"
    argv = ["train", "sft", "--model-path", str(tiny_model_dir), "--data-path", str(chat_data), "--ckpt-output-dir",
            str(out), "--effective-batch-size", "8", "--max-seq-len", "128", "--disable-progress-bar"]
    assert main(argv) == code
    printed = capsys.readouterr().out
    assert 'status: "stopped"' in printed and signal.Signals(signum).name in printed
    assert [p.name for p in (out / "state").iterdir()] == ["step_000000002"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers were put back
    monkeypatch.undo()
    assert main(argv + ["--resume", "true"]) == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))


def test_a_second_ctrl_c_aborts_at_once():
    from training_hub.engine.run import stop_on_signals

    with stop_on_signals() as flag:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag == {"stop": True, "signal": "SIGINT"}
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes
                math.sqrt(2.0)
