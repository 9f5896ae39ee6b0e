"""DPO in the native engine: parity with the trl backend, split-invariant loss, learning, refusals, resume.

Parity is checked on numbers both backends log for the same first step (policy == reference there, so the loss is
log 2 for both): the mean summed completion log-probs of the chosen and of the rejected answers, and the gradient
norm. They differ if either side scores a different token, so a mask or tokenization mismatch fails the test.
The learning test measures preference accuracy on the saved checkpoint with log-probs computed here
(``test_dpo.pair_logps``), not with the engine's own code.
"""

from __future__ import annotations

import json
import math

import pytest

from test_dpo import PAIRS, pair_logps, preference_records
from training_hub import dpo

torch = pytest.importorskip("torch")

COMMON = dict(beta=0.1, learning_rate=1e-3, effective_batch_size=8, max_seq_len=256, lr_scheduler="constant",
              disable_progress_bar=True, dtype="float32")  # exact comparisons: fp32 on every CPU


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def text_records():
    return [{"prompt": f"Question: {q}\nAnswer: ", "chosen": c, "rejected": r} for q, c, r in PAIRS]


def train_lines(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]


@pytest.fixture(scope="module")
def pref_path(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pref") / "pairs.jsonl", preference_records())


@pytest.fixture(scope="module")
def learned(tiny_model_dir, pref_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "run"
    result = dpo(str(tiny_model_dir), str(pref_path), str(out), backend="native", num_epochs=10,
                 max_tokens_per_gpu=4096, validation_data_path=str(pref_path), **COMMON)
    return result, out


def test_other_loss_types_are_refused_naming_trl(tiny_model_dir, pref_path, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"loss_type='ipo': the native dpo backend implements only the sigmoid "
                                         r"loss; use backend='trl'"):
        dpo(str(tiny_model_dir), str(pref_path), str(out), backend="native", loss_type="ipo")
    assert not out.exists()


@pytest.mark.parametrize("kind", ["messages", "text"])
def test_first_step_matches_trl(kind, tiny_model_dir, tmp_path):
    pytest.importorskip("trl")
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_records() if kind == "messages" else text_records())
    first = {}
    for backend in ("native", "trl"):
        dpo(str(tiny_model_dir), str(data), str(tmp_path / backend), backend=backend, max_steps=1,
            max_tokens_per_gpu=4096, **COMMON)
        first[backend] = train_lines(tmp_path / backend)[0]
    native, trl = first["native"], first["trl"]
    print(f"{kind}: " + ", ".join(f"{k} native {native[k]:.6f} trl {trl[k]:.6f}"
                                  for k in ("loss", "logps_chosen", "logps_rejected", "grad_norm")))
    assert native["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("loss", "logps_chosen", "logps_rejected", "grad_norm", "reward_margin"):
        assert abs(native[key] - trl[key]) < 1e-4, (key, native[key], trl[key])
    assert native["logps_chosen"] < -5 and native["logps_rejected"] < -5  # a real score, not an empty mask


def test_loss_and_gradient_do_not_depend_on_the_micro_batch_split(learned, tiny_model_dir, pref_path, tmp_path):
    """The same first step split into micro-batches of at most 128 tokens (a pair is ~40) logs the same numbers."""
    _, out = learned
    dpo(str(tiny_model_dir), str(pref_path), str(tmp_path / "split"), backend="native", max_steps=1,
        max_tokens_per_gpu=128, **{**COMMON, "max_seq_len": 128})
    whole, split = train_lines(out)[0], train_lines(tmp_path / "split")[0]
    for key in ("loss", "grad_norm", "logps_chosen", "logps_rejected", "loss_tokens", "tokens"):
        assert split[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-6), key
    with pytest.raises(ValueError, match="share one micro-batch. Raise max_tokens_per_gpu to at least"):
        dpo(str(tiny_model_dir), str(pref_path), str(tmp_path / "tiny_budget"), backend="native",
            max_tokens_per_gpu=32, truncate_long_samples=True, **{**COMMON, "max_seq_len": 32})


def test_native_dpo_learns_the_preferences(learned, tiny_model_dir, pref_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, out = learned
    assert result.status == "success" and result.metrics["steps"] == 10 and result.metrics["samples"] == 80
    lines = train_lines(out)
    assert [r["step"] for r in lines] == list(range(1, 11))
    margins = [r["reward_margin"] for r in lines]
    assert lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and margins[0] == 0.0
    assert all(b > a for a, b in zip(margins, margins[1:])), margins
    assert lines[-1]["reward_accuracy"] == 1.0 and lines[-1]["loss"] < lines[0]["loss"]
    validation = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                  if r["type"] == "validation"]
    assert len(validation) == 10 and validation[-1]["reward_accuracy"] >= 0.9

    tokenizer = AutoTokenizer.from_pretrained(result.checkpoint_path)
    policy = AutoModelForCausalLM.from_pretrained(result.checkpoint_path, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    pc, pr = pair_logps(policy, tokenizer, preference_records())
    rc, rr = pair_logps(reference, tokenizer, preference_records())
    margin = 0.1 * ((pc - rc) - (pr - rr))
    accuracy = (margin > 0).float().mean().item()
    print(f"native DPO: accuracy {accuracy:.3f} on the training pairs, mean margin {margin.mean().item():.4f} "
          f"(checkpoint) / {validation[-1]['reward_margin']:.4f} (logged validation); logged step margins "
          f"{margins[0]:.4f} -> {margins[-1]:.4f}")
    assert accuracy >= 0.9
    assert margin.mean().item() == pytest.approx(validation[-1]["reward_margin"], abs=1e-3)  # same model, same pairs


def test_resume_continues_the_same_run(learned, tiny_model_dir, pref_path, tmp_path):
    """3 steps, then resume to 6: the same metrics as the first 6 steps of the uninterrupted run."""
    _, out = learned
    run = tmp_path / "resumed"
    dpo(str(tiny_model_dir), str(pref_path), str(run), backend="native", num_epochs=10, max_steps=3,
        max_tokens_per_gpu=4096, **COMMON)
    with pytest.raises(ValueError, match="already holds a training run"):
        dpo(str(tiny_model_dir), str(pref_path), str(run), backend="native", **COMMON)
    result = dpo(str(tiny_model_dir), str(pref_path), str(run), backend="native", num_epochs=10, max_steps=6,
                 max_tokens_per_gpu=4096, resume=True, resume_changes=["max_steps"], **COMMON)
    assert result.metrics["steps"] == 6
    resumed, straight = train_lines(run), train_lines(out)[:6]
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(resumed, straight):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["reward_margin"] == pytest.approx(
            b["reward_margin"], abs=1e-5)


def test_a_dpo_step_reads_its_statistics_back_from_the_device_once(tiny_model_dir, pref_path, tmp_path, host_reads):
    """Loss, reward statistics and gradient norm come back in one read per step (several micro-batches here)."""
    from training_hub.engine import dpo as engine_dpo

    per_step = host_reads(engine_dpo.DPORecipe)
    dpo(str(tiny_model_dir), str(pref_path), str(tmp_path / "run"), backend="native", num_epochs=2,
        max_tokens_per_gpu=128, **{**COMMON, "max_seq_len": 128})
    assert len(per_step) == 2 and all(len(step) == 1 for step in per_step), per_step
    assert all(math.isfinite(r["reward_margin"]) for r in train_lines(tmp_path / "run"))
