"""The trl backends as a whole: availability, their own refusals before any work, and SFT with assistant-only loss.

The SFT check is exact: with one optimizer step covering the whole data set, TRL's first logged loss must equal
the starting model's mean NLL over the assistant tokens (from the chat template's generation markers), computed
here independently of TRL.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from training_hub import Availability
from training_hub.algorithms.sft import sft
from training_hub.backends.trl import TRLDPOBackend, TRLLoRASFTBackend, TRLSFTBackend

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

N_SAMPLES = 8


@pytest.fixture(scope="module")
def chat_path(tmp_path_factory):
    from training_hub.tiny import demo_data_path

    rows = [json.loads(line) for line in demo_data_path().read_text().splitlines()[:N_SAMPLES]]
    rows[0]["messages"].insert(0, {"role": "system", "content": "You are a terse assistant."})  # masked too
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mean_nll(model, tokenizer, conversations, assistant_only: bool) -> float:
    """Mean next-token NLL over the assistant tokens (or over every token), pooled over all samples."""
    total, count = 0.0, 0
    with torch.no_grad():
        for messages in conversations:
            enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
            ids = torch.tensor([enc["input_ids"]])
            mask = torch.tensor(enc["assistant_masks"] if assistant_only else [1] * ids.shape[1])
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            token_nll = -logprobs.gather(-1, ids[0, 1:, None])[:, 0]
            total += (token_nll * mask[1:]).sum().item()
            count += int(mask[1:].sum())
    return total / count


@pytest.mark.parametrize("backend", [TRLSFTBackend, TRLDPOBackend, TRLLoRASFTBackend])
def test_unavailable_without_trl_says_how_to_install(backend, monkeypatch):
    assert backend.is_available()  # trl, peft and accelerate are in the dev environment
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("trl", "peft") else real(name, *a))
    status = backend.is_available()
    assert isinstance(status, Availability) and not status
    assert "pip install training-hub[trl" in status.reason and "trl" in status.reason.split("(")[0]


def test_what_trl_cannot_do_is_one_error_before_any_work(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError) as info:
        sft(str(tmp_path / "no-model"), str(tmp_path / "no-data.jsonl"), str(out), backend="trl",
            is_pretraining=True, strategy="fsdp2", lr_scheduler="linear", lr_scheduler_kwargs={"min_lr_ratio": 0.1},
            nproc_per_node=2)
    text = str(info.value)
    for name in ("is_pretraining", "strategy", "lr_scheduler_kwargs", "nproc_per_node"):
        assert f"{name}" in text
    assert "problem(s)" in text and not out.exists()


@pytest.mark.slow
def test_sft_trl_assistant_only_loss(tiny_model_dir, chat_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    conversations = [json.loads(line)["messages"] for line in chat_path.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assistant_nll = mean_nll(start, tokenizer, conversations, assistant_only=True)
    every_nll = mean_nll(start, tokenizer, conversations, assistant_only=False)

    out = tmp_path / "sft"
    result = sft(str(tiny_model_dir), str(chat_path), str(out), backend="trl", learning_rate=2e-3, num_epochs=4,
                 effective_batch_size=N_SAMPLES, max_tokens_per_gpu=N_SAMPLES * 256, max_seq_len=256,
                 lr_scheduler="constant", disable_progress_bar=True)
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in train]
    print(f"trl sft: step-1 loss {losses[0]:.5f}, assistant-only NLL {assistant_nll:.5f}, all-token NLL "
          f"{every_nll:.5f}; losses {[round(x, 3) for x in losses]}")
    assert [r["step"] for r in train] == [1, 2, 3, 4] and all("lr" in r for r in train)
    assert losses[0] == pytest.approx(assistant_nll, abs=1e-4)  # loss on assistant tokens only ...
    assert abs(every_nll - assistant_nll) > 1e-3  # ... which is measurably not the all-token loss
    assert losses[-1] < losses[0] - 0.3
    assert result.metrics["final_loss"] == losses[-1] and result.metrics["steps"] == 4

    trained = AutoModelForCausalLM.from_pretrained(result.checkpoint_path, dtype=torch.float32).eval()
    assert mean_nll(trained, AutoTokenizer.from_pretrained(result.checkpoint_path), conversations, True) < losses[-1]
