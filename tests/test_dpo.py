"""DPO: the declaration, the sigmoid loss against TRL's, and a tiny end-to-end run through the trl backend.

The end-to-end run trains the tiny random model on eight preference pairs, then measures, on the saved
checkpoint, how often the policy/reference log-ratio prefers the chosen answer (computed here, not read from TRL).
"""

from __future__ import annotations

import json
import math

import pytest

from training_hub.algorithms.dpo import DPOAlgorithm, DPOConfig, dpo
from training_hub.backends.trl import TRLDPOBackend
from training_hub.config.declare import ParameterError, validate_params

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

PAIRS = [
    ("What is 2 plus 3?", "Five.", "Seven."),
    ("Name a color.", "Blue.", "Banana."),
    ("What is the capital of France?", "Paris.", "London."),
    ("Say hello.", "Hello!", "Goodbye."),
    ("Is fire hot?", "Yes, fire is hot.", "No, fire is cold."),
    ("What color is the sky?", "The sky is blue.", "The sky is green."),
    ("Count to three.", "1, 2, 3.", "3, 2, 1."),
    ("What is the opposite of up?", "Down.", "Left."),
]


def preference_records():
    return [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for q, c, r in PAIRS]


@pytest.fixture(scope="module")
def pref_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("pref") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in preference_records()))
    return path


def tokenized_pair(tokenizer, record, which):
    """(input_ids, completion_mask) of prompt + completion, the completion after the generation prompt."""
    prompt = tokenizer.apply_chat_template(record["prompt"], add_generation_prompt=True, tokenize=True)["input_ids"]
    full = tokenizer.apply_chat_template(record["prompt"] + record[which], tokenize=True)["input_ids"]
    assert full[:len(prompt)] == prompt
    return full, [0] * len(prompt) + [1] * (len(full) - len(prompt))


def pair_logps(model, tokenizer, records):
    """Summed completion log-probs of chosen and rejected for each record: two (n,) tensors."""
    from training_hub.losses.dpo import sequence_logps

    out = {"chosen": [], "rejected": []}
    with torch.no_grad():
        for record in records:
            for which in out:
                ids, mask = tokenized_pair(tokenizer, record, which)
                ids, mask = torch.tensor([ids]), torch.tensor([mask])
                out[which].append(sequence_logps(model(input_ids=ids).logits, ids, mask)[0])
    return torch.stack(out["chosen"]), torch.stack(out["rejected"])


# --------------------------------------------------------------------------------------- declaration


def test_declaration_has_dpo_parameters_once():
    required = DPOAlgorithm(backend=None).get_required_params()
    optional = DPOAlgorithm(backend=None).get_optional_params()
    assert set(required) == {"model_path", "data_path", "ckpt_output_dir"}
    for name in ("beta", "loss_type", "max_length", "max_prompt_length", "learning_rate", "effective_batch_size"):
        assert name in optional
    config = validate_params(DPOConfig, {"model_path": "m", "data_path": "d", "ckpt_output_dir": "o"})
    assert (config.beta, config.loss_type, config.effective_max_length) == (0.1, "sigmoid", config.max_seq_len)
    assert "beta" in str(__import__("inspect").signature(dpo))


def test_bad_parameters_are_reported_together():
    with pytest.raises(ParameterError) as info:
        DPOAlgorithm(backend=None).validate({"model_path": "m", "data_path": "d", "ckpt_output_dir": "o",
                                             "beta": 0.0, "loss_type": "sigmod", "bta": 1.0})
    text = str(info.value)
    assert "beta: must be > 0.0" in text
    assert "did you mean 'sigmoid'" in text
    assert "bta: unknown parameter; did you mean 'beta'?" in text
    with pytest.raises(ParameterError, match="max_prompt_length: 64 leaves no room"):
        validate_params(DPOConfig, {"model_path": "m", "data_path": "d", "ckpt_output_dir": "o",
                                    "max_length": 64, "max_prompt_length": 64})
    with pytest.raises(ParameterError, match="is_pretraining: unknown parameter"):  # an SFT-only setting
        validate_params(DPOConfig, {"model_path": "m", "data_path": "d", "ckpt_output_dir": "o",
                                    "is_pretraining": True})


def test_bad_preference_data_fails_before_loading_the_model(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    out = tmp_path / "out"
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ValueError, match=r"bad\.jsonl:1.*rejected"):
        dpo(model_path=str(tiny_model_dir), data_path=str(data), ckpt_output_dir=str(out), backend="trl")
    assert not out.exists()


def test_seed_sample_can_replace_the_builtin(clean_registry):
    from training_hub import Algorithm

    class SeedDPO(Algorithm):  # the guide's shape, reduced
        def __init__(self, backend, **kwargs):
            self.backend = backend

        def train(self, **kwargs):
            return self.backend.execute_training(kwargs)

        def get_required_params(self):
            return {"model_path": str, "data_path": str, "ckpt_output_dir": str}

        def get_optional_params(self):
            return {"beta": float}

    clean_registry.register_algorithm("dpo", SeedDPO)
    assert clean_registry.get_algorithm("dpo") is SeedDPO


# --------------------------------------------------------------------------------------- loss


def test_sigmoid_loss_basics():
    from training_hub.losses.dpo import dpo_sigmoid_loss

    zeros = torch.zeros(3)
    loss, chosen, rejected = dpo_sigmoid_loss(zeros, zeros, zeros, zeros, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
    loss, chosen, rejected = dpo_sigmoid_loss(pc, pr, rc, rr, beta=0.5)
    expected = -torch.nn.functional.logsigmoid(torch.tensor([0.5 * (1 - (-1)), 0.5 * (0 - 1)])).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-7)
    assert chosen.tolist() == pytest.approx([0.5, 0.0]) and rejected.tolist() == pytest.approx([-0.5, 0.5])
    with pytest.raises(ValueError):
        dpo_sigmoid_loss(pc, pr, rc, rr, beta=0.0)


def test_sigmoid_loss_matches_trl_on_the_same_batch(tiny_model_dir, pref_path, tmp_path):
    """TRL's DPOTrainer.compute_loss on its first batch == dpo_sigmoid_loss on log-probs computed here.

    The reference is a perturbed copy so the loss is not trivially log 2; with reference == policy it is.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    from training_hub.backends.trl import preference_dataset
    from training_hub.losses.dpo import dpo_sigmoid_loss

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    records = preference_records()
    args = TRLDPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(records), beta=0.3,
                        use_cpu=True, bf16=False, report_to=[], activation_checkpointing=False, max_length=None,
                        disable_tqdm=True)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, processing_class=tokenizer,
                         train_dataset=preference_dataset(records))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(records))])
    policy.eval()  # no dropout in the tiny model; eval only to make that explicit
    with torch.no_grad():
        trl_loss = trainer.compute_loss(policy, batch).item()

    ours = dpo_sigmoid_loss(*pair_logps(policy, tokenizer, records), *pair_logps(ref, tokenizer, records), beta=0.3)
    print(f"DPO loss, TRL {trl_loss:.6f} vs dpo_sigmoid_loss {ours[0].item():.6f}")
    assert abs(ours[0].item() - trl_loss) < 1e-4, (ours[0].item(), trl_loss)
    assert abs(trl_loss - math.log(2)) > 1e-2  # the perturbed reference makes the comparison non-trivial
    same = dpo_sigmoid_loss(*pair_logps(policy, tokenizer, records), *pair_logps(policy, tokenizer, records), 0.3)
    assert same[0].item() == pytest.approx(math.log(2), abs=1e-6)  # step 0 with reference == policy


# --------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_dpo_trl_learns_the_preferences(tiny_model_dir, pref_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "dpo"
    result = dpo(str(tiny_model_dir), str(pref_path), str(out), backend="trl", beta=0.1, learning_rate=1e-3,
                 num_epochs=10, effective_batch_size=8, max_tokens_per_gpu=4096, max_seq_len=256,
                 lr_scheduler="constant", disable_progress_bar=True)
    assert result.status == "success" and result["output_dir"] == str(out)
    assert result.metrics["steps"] == 10

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["type"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 11))
    assert {"loss", "lr", "reward_margin", "reward_accuracy"} <= set(train[0])
    margins = [r["reward_margin"] for r in train]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
    assert all(b > a for a, b in zip(margins, margins[1:])), margins  # rising margin (full-batch steps)
    assert result.metrics["final_loss"] == train[-1]["loss"] < train[0]["loss"]

    tokenizer = AutoTokenizer.from_pretrained(result.checkpoint_path)
    policy = AutoModelForCausalLM.from_pretrained(result.checkpoint_path, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    pc, pr = pair_logps(policy, tokenizer, preference_records())
    rc, rr = pair_logps(reference, tokenizer, preference_records())
    margin = (pc - rc) - (pr - rr)
    accuracy = (margin > 0).float().mean().item()
    print(f"DPO accuracy on the training pairs: {accuracy:.3f}; mean implicit reward margin "
          f"{0.1 * margin.mean().item():.4f}; logged margins {margins[0]:.4f} -> {margins[-1]:.4f}")
    assert accuracy >= 0.9
    assert 0.1 * margin.mean().item() == pytest.approx(margins[-1], rel=0.5)  # same order as TRL's last log

    with pytest.raises(ValueError, match="already holds a training run"):
        dpo(str(tiny_model_dir), str(pref_path), str(out), backend="trl")
