"""The native SFT loop end to end on the tiny model: checkpoints, metrics, resume, memory bound, learning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from training_hub.algorithms.sft import SFTConfig

QA = [("What is the capital of France?", "Paris."), ("What color is the sky?", "Blue."),
      ("How many legs does a spider have?", "Eight."), ("What is 2 plus 3?", "5."),
      ("Who wrote Hamlet?", "William Shakespeare."), ("What is the opposite of hot?", "Cold.")]


def write_chat(path: Path, repeats: int = 8) -> Path:
    with open(path, "w") as f:
        for _ in range(repeats):
            for q, a in QA:
                f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                                 {"role": "assistant", "content": a}]}) + "\n")
    return path


def run_config(model: Path, data: Path, out: Path, **overrides) -> SFTConfig:
    params = dict(model_path=str(model), data_path=str(data), ckpt_output_dir=str(out), max_seq_len=128,
                  effective_batch_size=8, learning_rate=3e-3, lr_scheduler="cosine", warmup_steps=2,
                  weight_decay=0.01, disable_progress_bar=True, seed=7)
    params.update(overrides)
    return SFTConfig(**params)


def train(*args, **kwargs):
    from training_hub.engine.trainer import train_sft

    return train_sft(run_config(*args, **kwargs))


def load_weights(checkpoint: str | Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(checkpoint) / "model.safetensors"))


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    return write_chat(tmp_path_factory.mktemp("data") / "chat.jsonl")


@pytest.fixture(scope="module")
def short_run(tiny_model_dir, chat_data, tmp_path_factory):
    """4 steps with a save every 16 samples and a validation split evaluated every 2 steps."""
    out = tmp_path_factory.mktemp("short") / "run"
    result = train(tiny_model_dir, chat_data, out, max_steps=4, save_samples=16, validation_split=0.25,
                   eval_steps=2, keep_last_n_checkpoints=5)
    return result, out


# ------------------------------------------------------------------------------------- layout and outputs

def test_layout_and_result(short_run):
    result, out = short_run
    assert result.status == "success" and result["status"] == "success"
    assert sorted(p.name for p in (out / "hf_format").iterdir()) == ["samples_16", "samples_32"]
    assert result.checkpoint_path == str(out / "hf_format" / "samples_32")
    assert [p.name for p in (out / "state").iterdir()] == ["step_000000004"]  # only the newest state is kept
    assert not list(out.rglob(".tmp-*"))
    m = result.metrics
    assert m["steps"] == 4 and m["samples"] == 32
    assert m["tokens"] > 0 and m["tokens_per_second"] > 0 and m["peak_memory_bytes"] > 50 * 2**20
    assert m["final_loss"] > 0
    assert m["validation_loss"] > 0


def test_metrics_jsonl_has_one_record_per_step_and_validation_records(short_run):
    result, out = short_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    fields = {"step", "epoch", "loss", "lr", "grad_norm", "samples", "tokens", "loss_tokens", "tokens_per_second",
              "elapsed"}
    for r in train_records:
        assert fields <= set(r)
        assert r["samples"] == 8 and r["tokens"] > r["loss_tokens"] > 0 and r["loss"] > 0
        assert r["tokens_per_second"] > 0 and r["grad_norm"] > 0
    assert train_records[0]["lr"] == pytest.approx(3e-3 / 2)  # warmup: step 1 of 2
    assert [r["elapsed"] for r in train_records] == sorted(r["elapsed"] for r in train_records)
    assert sum(r["tokens"] for r in train_records) == result.metrics["tokens"]
    assert train_records[-1]["loss"] == pytest.approx(result.metrics["final_loss"])
    validation = [r for r in records if r["type"] == "validation"]
    assert [r["step"] for r in validation] == [2, 4]
    assert all(r["loss"] > 0 and r["loss_tokens"] > 0 for r in validation)
    assert validation[-1]["loss"] == pytest.approx(result.metrics["validation_loss"])


def test_checkpoint_loads_with_plain_transformers(short_run, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, out = short_run
    ckpt = Path(result.checkpoint_path)
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (ckpt / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    original = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == original.apply_chat_template(chat, tokenize=False)
    # the loaded weights are the trained weights (the fp32 master copy in the training state), not the start
    trained = torch.load(out / "state" / "step_000000004" / "model.pt", weights_only=True)
    for name, param in model.state_dict().items():
        torch.testing.assert_close(param, trained[name], atol=0, rtol=0, msg=name)
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(start.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_checkpoint_keeps_the_dtype_the_model_was_stored_in(tiny_model_dir, chat_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bf16_dir = tmp_path / "bf16_model"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(bf16_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(bf16_dir)
    result = train(bf16_dir, chat_data, tmp_path / "out", max_steps=1)  # trains with fp32 master weights
    assert json.loads((Path(result.checkpoint_path) / "config.json").read_text())["dtype"] == "bfloat16"
    assert {w.dtype for w in load_weights(result.checkpoint_path).values()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(result.checkpoint_path).dtype == torch.bfloat16


def test_existing_run_without_resume_is_reported_not_used(short_run, tiny_model_dir, chat_data):
    from training_hub.engine.checkpoint import ExistingRunError

    result, out = short_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ExistingRunError, match=r"already holds a training run.*step_000000004.*resume=True"):
        train(tiny_model_dir, chat_data, out, max_steps=4)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # nothing touched


def test_resume_with_changed_plan_is_an_error(short_run, tiny_model_dir, chat_data):
    result, out = short_run
    with pytest.raises(ValueError, match="effective_batch_size: saved 8, now 4"):
        train(tiny_model_dir, chat_data, out, max_steps=4, validation_split=0.25, effective_batch_size=4,
              resume=True)


def test_gradient_checkpointing_is_exact_and_bf16_autocast_is_close(tiny_model_dir, chat_data, tmp_path):
    def losses(name, **kw):
        train(tiny_model_dir, chat_data, tmp_path / name, max_steps=3, save_final_checkpoint=False, **kw)
        return [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    fp32 = losses("fp32", dtype="float32")
    assert losses("checkpointed", dtype="float32", gradient_checkpointing=True) == pytest.approx(fp32, abs=1e-5)
    bf16 = losses("bf16", dtype="bfloat16")  # autocast on CPU; fp32 master weights
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, abs=0.05)


# ------------------------------------------------------------------------------------- planning errors

def test_sample_longer_than_token_budget_fails_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    from training_hub.engine import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("model loaded before planning"))
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"document": "the quick brown fox " * 40}) + "\n" for _ in range(4)))
    with pytest.raises(ValueError, match=r"longer than max_tokens_per_gpu=32 .*Raise max_tokens_per_gpu"):
        train(tiny_model_dir, docs, tmp_path / "out", is_pretraining=True, max_seq_len=64, max_tokens_per_gpu=32)


def test_multi_process_is_a_clear_error(tiny_model_dir, chat_data, tmp_path):
    # (W&B / TensorBoard / MLflow now take effect: tests/test_loggers.py; use_liger warns in training_hub.config.upstream:
    # tests/test_upstream_compat.py)
    with pytest.raises(ValueError, match=r"train_sft\(\) is one process of a run; start several through sft"):
        train(tiny_model_dir, chat_data, tmp_path / "a", nproc_per_node=2)  # sft() launches torchrun instead


def test_micro_batches_never_exceed_the_token_budget(tiny_model_dir, tmp_path, monkeypatch):
    """Count the tokens of every forward the engine runs, on a step that needs several micro-batches."""
    from training_hub.engine import loading

    seen = []
    real_load = loading.load_model

    def load_and_watch(*args, **kwargs):
        model, dtype = real_load(*args, **kwargs)
        model.register_forward_pre_hook(lambda mod, a, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True)
        return model, dtype

    monkeypatch.setattr(loading, "load_model", load_and_watch)
    data = write_chat(tmp_path / "big.jsonl", repeats=16)  # 96 samples
    result = train(tiny_model_dir, data, tmp_path / "out", max_seq_len=64, max_tokens_per_gpu=64,
                   effective_batch_size=48, max_steps=2, save_final_checkpoint=False)
    assert result.metrics["steps"] == 2
    assert max(seen) <= 64
    assert sum(seen) == result.metrics["tokens"]  # every token of both steps went through exactly once


# ----------------------------------------------------------------------------------- kill and resume

CHILD = textwrap.dedent("""
    import json, sys, time
    from training_hub.engine import checkpoint, metrics
    kwargs, marker = json.loads(sys.argv[1]), sys.argv[2]
    first = {}
    real_save, real_write = checkpoint.save_training_state, metrics.MetricsWriter.write

    def save_state(root, **kw):  # remember the step of the first complete state
        path = real_save(root, **kw)
        first.setdefault("step", kw["progress"]["global_step"])
        return path

    def write(self, record):  # two steps after the first state, signal the parent and wait to be killed
        real_write(self, record)
        if "step" in first and record["step"] >= first["step"] + 2:
            open(marker, "w").close()
            time.sleep(600)

    checkpoint.save_training_state, metrics.MetricsWriter.write = save_state, write
    import training_hub
    getattr(training_hub, sys.argv[3])(**kwargs)  # sft(...), osft(...)
""")


def run_until_killed(algorithm: str, kwargs: dict, out: Path, marker: Path) -> None:
    """Run ``training_hub.<algorithm>(**kwargs)`` in a child and SIGKILL it two steps after its first saved state."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps({**kwargs, "ckpt_output_dir": str(out)}),
                              str(marker), algorithm], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "the child never reached its first saved state"
            time.sleep(0.2)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
def test_sigkill_then_resume_ends_with_the_same_weights(tiny_model_dir, chat_data, tmp_path):
    kwargs = dict(model_path=str(tiny_model_dir), data_path=str(chat_data), max_seq_len=128, effective_batch_size=8,
                  learning_rate=3e-3, lr_scheduler="cosine", warmup_steps=2, weight_decay=0.01, seed=7,
                  num_epochs=2, save_samples=16, disable_progress_bar=True)
    killed = tmp_path / "killed"
    run_until_killed("sft", kwargs, killed, tmp_path / "marker")
    assert [p.name for p in (killed / "state").iterdir()] == ["step_000000002"]
    assert max(json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()) == 4

    from training_hub.engine.trainer import train_sft

    resumed = train_sft(SFTConfig(**kwargs, ckpt_output_dir=str(killed), resume=True))
    reference = train_sft(SFTConfig(**kwargs, ckpt_output_dir=str(tmp_path / "reference")))
    assert resumed.metrics["steps"] == reference.metrics["steps"] == 12
    assert Path(resumed.checkpoint_path).name == Path(reference.checkpoint_path).name == "samples_96"
    got, want = load_weights(resumed.checkpoint_path), load_weights(reference.checkpoint_path)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0, msg=name)
    # metrics.jsonl reads as one uninterrupted run: every step once, with the reference's losses
    steps = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    ref_steps = [json.loads(line) for line in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in ref_steps], abs=1e-6)


def test_sigterm_saves_the_state_and_stops_then_resume_finishes(tiny_model_dir, chat_data, tmp_path, monkeypatch):
    from training_hub.engine import metrics

    real_write = metrics.MetricsWriter.write

    def write(self, record):  # the scheduler's SIGTERM arrives while step 2 is being logged
        real_write(self, record)
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(metrics.MetricsWriter, "write", write)
    out = tmp_path / "run"
    stopped = train(tiny_model_dir, chat_data, out)  # 48 samples / 8 = 6 steps
    assert stopped.status == "stopped" and stopped.metrics["steps"] == 2
    assert stopped.checkpoint_path is None  # no HF checkpoint was due; the training state is what was saved
    assert [p.name for p in (out / "state").iterdir()] == ["step_000000002"]
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was removed again
    done = train(tiny_model_dir, chat_data, out, resume=True)
    assert done.status == "success" and done.metrics["steps"] == 6 and done.metrics["samples"] == 48
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))


# ---------------------------------------------------------------------------------------- memory bound

MEMORY_CHILD = textwrap.dedent("""
    import json, sys
    from training_hub import sft
    result = sft(**json.loads(sys.argv[1]))
    print("RESULT " + json.dumps(result.metrics))
""")


def _peak_rss(tiny_model_dir, data, out, budget: int, batch: int) -> int:
    kwargs = dict(model_path=str(tiny_model_dir), data_path=str(data), ckpt_output_dir=str(out), max_seq_len=128,
                  max_tokens_per_gpu=budget, effective_batch_size=batch, max_steps=1, save_final_checkpoint=False,
                  disable_progress_bar=True)
    done = subprocess.run([sys.executable, "-c", MEMORY_CHILD, json.dumps(kwargs)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])["peak_memory_bytes"]


@pytest.mark.slow
def test_peak_memory_is_bounded_by_the_token_budget_not_the_data(tiny_model_dir, tmp_path):
    """One step over all the data: 1x vs 16x the data (and batch) at the same token budget use the same memory.

    The control run gives the 16x step an unbounded budget, i.e. what an engine that ignored max_tokens_per_gpu
    would do; it must show a large growth, which proves this test can fail.
    """
    small = write_chat(tmp_path / "small.jsonl", repeats=8)   # 48 samples
    large = write_chat(tmp_path / "large.jsonl", repeats=128)  # 768 samples, ~16k tokens in one step
    base = _peak_rss(tiny_model_dir, small, tmp_path / "a", budget=256, batch=48)
    same_budget = _peak_rss(tiny_model_dir, large, tmp_path / "b", budget=256, batch=768)
    no_budget = _peak_rss(tiny_model_dir, large, tmp_path / "c", budget=32768, batch=768)
    mib = 2**20
    print(f"peak RSS MiB: base {base / mib:.0f}, 16x data same budget {same_budget / mib:.0f}, "
          f"16x data no budget {no_budget / mib:.0f}")
    # measured: +23 MiB (16x the rows in the data set and its plan), against +190 MiB for the unbounded control
    assert same_budget - base < 40 * mib, (base / mib, same_budget / mib)
    assert no_budget - base > 150 * mib, (base / mib, no_budget / mib)


# ------------------------------------------------------------------------------------------- it learns

@pytest.mark.slow
def test_tiny_model_learns_the_chat_word_for_word(tiny_model_dir, chat_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = train(tiny_model_dir, chat_data, tmp_path / "out", num_epochs=15, lr_scheduler="constant",
                   warmup_steps=5, weight_decay=0.0)
    assert result.metrics["final_loss"] < 0.3
    tokenizer = AutoTokenizer.from_pretrained(result.checkpoint_path)
    model = AutoModelForCausalLM.from_pretrained(result.checkpoint_path).eval()
    answers = {}
    for question, _ in QA:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        out = model.generate(**prompt, max_new_tokens=24, do_sample=False)
        answers[question] = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert answers == dict(QA)


def test_peak_memory_is_this_programs_own_not_the_forking_parents():
    """ru_maxrss alone would report a big parent's memory for a child it started (inherited at exec)."""
    ballast = bytearray(400 * 2**20)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # touch every page so it is resident
    code = ("import torch; from training_hub.engine.metrics import peak_memory_bytes; "
            "print(peak_memory_bytes(torch.device('cpu')))")
    child_peak = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    check=True).stdout)
    assert child_peak < 400 * 2**20, child_peak / 2**20
    del ballast


def test_a_training_state_is_written_once_per_point_of_progress(tiny_model_dir, chat_data, tmp_path, monkeypatch):
    """save_samples falling on the last step and the final save: one state there, not two (at 8B each is ~100 GB)."""
    from training_hub.engine import trainer

    written = []
    real = trainer.SFTRecipe.save_state
    monkeypatch.setattr(trainer.SFTRecipe, "save_state",
                        lambda self, progress: written.append(progress["global_step"]) or real(self, progress))
    result = train(tiny_model_dir, chat_data, tmp_path / "out", effective_batch_size=4, max_steps=2, save_samples=4)
    assert result.status == "success"
    assert written == [1, 2]
    assert sorted(p.name for p in (tmp_path / "out" / "hf_format").iterdir()) == ["samples_4", "samples_8"]


def test_a_training_step_reads_values_back_from_the_device_once(tiny_model_dir, chat_data, tmp_path, host_reads):
    """The loss and the gradient norm come back to the host together, in one read after the clip: on a GPU every
    read waits for the queued work, so each one more is a stall per step."""
    from training_hub.engine import trainer

    per_step = host_reads(trainer.SFTRecipe)
    result = train(tiny_model_dir, chat_data, tmp_path / "run", max_steps=3, save_final_checkpoint=False)
    assert len(per_step) == 3 and result.metrics["steps"] == 3
    assert all(len(step) == 1 for step in per_step), per_step
