"""LoRA SFT in the native engine: PEFT-format adapter, frozen base, exact merge, parity with the trl backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training_hub import lora_sft

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
COMMON = dict(lora_r=8, lora_alpha=16.0, target_modules=TARGETS, learning_rate=5e-3, effective_batch_size=16,
              num_epochs=2, max_tokens_per_gpu=4096, max_seq_len=256, lr_scheduler="constant",
              disable_progress_bar=True, dtype="float32")  # exact comparisons: fp32 on every CPU


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def sample_ids(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of Poland?"},
                                          {"role": "assistant", "content": "Warsaw."}], tokenize=False)
    return torch.tensor([tokenizer(text)["input_ids"]])


def train_lines(out) -> list[dict]:
    return [r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]


@pytest.fixture(scope="module")
def chat_path(tmp_path_factory):
    from training_hub.tiny import demo_data_path

    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("\n".join(demo_data_path().read_text().splitlines()[:16]) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tiny_model_dir, chat_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    return lora_sft(str(tiny_model_dir), str(chat_path), str(out), backend="native", merge=True, **COMMON)


def test_qlora_is_refused_before_any_work(tmp_path):
    out = tmp_path / "out"
    expected = ("QLoRA needs CUDA and bitsandbytes" if not torch.cuda.is_available()
                else "load_in_4bit")  # with CUDA + bitsandbytes: the native backend still points to trl
    with pytest.raises(ValueError, match=expected):
        lora_sft(str(tmp_path / "no-model"), str(tmp_path / "no-data.jsonl"), str(out), backend="native",
                 load_in_4bit=True)
    assert not out.exists()


def test_adapter_in_peft_format_and_only_adapter_weights_trained(trained, tiny_model_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = Path(trained.checkpoint_path)
    assert trained.status == "success" and trained.metrics["steps"] == 2
    assert {p.name for p in adapter.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                    "tokenizer.json"}
    assert not (adapter / "model.safetensors").exists()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    assert set(config["target_modules"]) == set(TARGETS) and config["base_model_name_or_path"] == str(tiny_model_dir)
    assert len(load_file(str(adapter / "adapter_model.safetensors"))) == 2 * 2 * len(TARGETS)  # A, B x 2 layers

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    ids = sample_ids(AutoTokenizer.from_pretrained(adapter))
    base_logits = logits(base, ids)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    assert (logits(model, ids) - base_logits).abs().max().item() > 1e-3  # the loaded adapter changes the output

    state = torch.load(next((Path(trained.output_dir) / "state").iterdir()) / "model.pt", weights_only=True)
    lora_keys = [k for k in state if "lora_" in k]
    assert len(lora_keys) == 2 * 2 * len(TARGETS)
    base_keys = [k for k in state if "lora_" not in k]
    assert {k.replace(".base_layer", "") for k in base_keys} == set(original)
    assert all(torch.equal(state[k], original[k.replace(".base_layer", "")]) for k in base_keys)  # base untouched
    assert all(state[k].abs().max() > 0 for k in lora_keys if "lora_B" in k)  # B started at zero and trained
    losses = [r["loss"] for r in train_lines(trained.output_dir)]
    print(f"native LoRA losses: {losses}")
    assert len(losses) == 2 and losses[-1] < losses[0]


def test_merged_checkpoint_equals_adapter_model(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir = trained["merged_path"]
    assert trained.metrics["merged_path"] == merged_dir == str(Path(trained.output_dir) / "merged")
    ids = sample_ids(AutoTokenizer.from_pretrained(merged_dir))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    adapter_model = PeftModel.from_pretrained(base, trained.checkpoint_path).eval()
    diff = (logits(merged, ids) - logits(adapter_model, ids)).abs().max().item()
    print(f"native LoRA: max |merged - adapter| logit difference {diff:.2e}")
    assert diff < 1e-4


def test_native_and_trl_train_the_same_adapter(trained, tiny_model_dir, chat_path, tmp_path):
    """Same data in one full-batch step per epoch, same seed: the same loss at step 1 (adapter-independent, as
    lora_B starts at zero) and at step 2 (after one update of adapters initialised from the same seed)."""
    pytest.importorskip("trl")
    lora_sft(str(tiny_model_dir), str(chat_path), str(tmp_path / "trl"), backend="trl", **COMMON)
    native, trl = train_lines(trained.output_dir), train_lines(tmp_path / "trl")
    print("native vs trl LoRA: " + "; ".join(
        f"step {a['step']} loss {a['loss']:.7f} / {b['loss']:.7f}, grad_norm {a['grad_norm']:.6f} / {b['grad_norm']:.6f}"
        for a, b in zip(native, trl)))
    assert len(native) == len(trl) == 2
    for a, b in zip(native, trl):
        assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4


def test_dora_adapter_loads_and_merges_exactly(tiny_model_dir, chat_path, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = lora_sft(str(tiny_model_dir), str(chat_path), str(tmp_path / "dora"), backend="native", use_dora=True,
                      merge=True, **{**COMMON, "num_epochs": 1, "target_modules": ["q_proj", "v_proj"]})
    config = json.loads((Path(result.checkpoint_path) / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    ids = sample_ids(AutoTokenizer.from_pretrained(result.checkpoint_path))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base_logits = logits(base.eval(), ids)
    adapter_model = PeftModel.from_pretrained(base, result.checkpoint_path).eval()
    merged = AutoModelForCausalLM.from_pretrained(result["merged_path"], dtype=torch.float32).eval()
    assert (logits(adapter_model, ids) - base_logits).abs().max().item() > 1e-4  # one step moved it
    assert (logits(merged, ids) - logits(adapter_model, ids)).abs().max().item() < 1e-4
