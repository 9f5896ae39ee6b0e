"""LoRA SFT through the trl backend: adapter in PEFT format, merge equal to the adapter model, QLoRA refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training_hub.algorithms.lora import LoRASFTAlgorithm, LoRASFTConfig, lora_sft
from training_hub.backends.trl import TRLLoRASFTBackend
from training_hub.config.declare import ParameterError, validate_params

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("peft")

LORA_NAMES = ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "use_dora", "load_in_4bit", "merge")


@pytest.fixture(scope="module")
def chat_path(tmp_path_factory):
    from training_hub.tiny import demo_data_path

    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("\n".join(demo_data_path().read_text().splitlines()[:16]) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tiny_model_dir, chat_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    result = lora_sft(str(tiny_model_dir), str(chat_path), str(out), backend="trl", lora_r=8, lora_alpha=16.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], merge=True, learning_rate=5e-3,
                      num_epochs=2, effective_batch_size=8, max_tokens_per_gpu=2048, max_seq_len=256,
                      lr_scheduler="constant", disable_progress_bar=True)
    return result


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def sample_ids(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of Poland?"},
                                          {"role": "assistant", "content": "Warsaw."}], tokenize=False)
    return torch.tensor([tokenizer(text)["input_ids"]])


def test_declaration_is_sft_plus_lora():
    from training_hub.algorithms.sft import SFTConfig
    from training_hub.config.declare import param_specs

    from training_hub.algorithms.lora import LoRAUpstreamParams

    lora, sft = param_specs(LoRASFTConfig), param_specs(SFTConfig)
    assert set(lora) == set(sft) | set(LORA_NAMES) | set(param_specs(LoRAUpstreamParams))
    assert all(lora[name].group == "LoRA" for name in LORA_NAMES)
    with pytest.raises(ParameterError) as info:
        validate_params(LoRASFTConfig, {"model_path": "m", "data_path": "d", "ckpt_output_dir": "o",
                                        "lora_r": 0, "lora_dropout": 1.5, "lora_rank": 8})
    text = str(info.value)
    assert "lora_r: must be > 0" in text and "lora_dropout: must be < 1.0" in text
    assert "lora_rank: unknown parameter; did you mean 'lora_r'?" in text


def test_qlora_without_cuda_is_a_clear_error_before_any_work(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal is for machines without it")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="load_in_4bit: QLoRA needs CUDA and bitsandbytes, but CUDA is not available"):
        lora_sft(str(tmp_path / "no-model"), str(tmp_path / "no-data.jsonl"), str(out), backend="trl",
                 load_in_4bit=True)
    assert not out.exists()  # nothing was written: the refusal came before data, model or output dir


@pytest.mark.slow
def test_adapter_is_saved_in_peft_format(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = trained.checkpoint_path
    assert trained.status == "success" and trained.metrics["steps"] == 4
    files = {p.name for p in Path(adapter).iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert "model.safetensors" not in files  # the adapter only, not a full copy of the model
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert config["base_model_name_or_path"] == str(tiny_model_dir)

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = sample_ids(tokenizer)
    base_logits = logits(base, ids)
    model = PeftModel.from_pretrained(base, adapter).eval()
    assert (logits(model, ids) - base_logits).abs().max().item() > 1e-3  # the adapter learned something
    lines = (Path(trained.output_dir) / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines]
    assert len(losses) == 4 and losses[-1] < losses[0]


@pytest.mark.slow
def test_merged_checkpoint_equals_adapter_model(trained, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training_hub.lora_merge import merge_adapter

    merged_dir = trained["merged_path"]
    assert trained.metrics["merged_path"] == merged_dir
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)  # the tokenizer travelled with the merge
    assert tokenizer.chat_template
    ids = sample_ids(tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()  # plain transformers
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    adapter_model = PeftModel.from_pretrained(base, trained.checkpoint_path).eval()
    diff = (logits(merged, ids) - logits(adapter_model, ids)).abs().max().item()
    print(f"max |merged - adapter| logit difference: {diff:.2e}")
    assert diff < 1e-4

    again = merge_adapter(trained.checkpoint_path, tmp_path / "merged2")  # the standalone function (CLI merge)
    again_model = AutoModelForCausalLM.from_pretrained(again, dtype=torch.float32).eval()
    assert (logits(again_model, ids) - logits(merged, ids)).abs().max().item() == 0.0
    with pytest.raises(ValueError, match="exists and is not empty"):
        merge_adapter(trained.checkpoint_path, again)
    with pytest.raises(ValueError, match="not a PEFT adapter directory"):
        merge_adapter(tiny_model_dir, tmp_path / "merged3")


def test_a_target_module_typo_lists_the_model_linear_layers_before_any_data_work(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    for backend in ("native", "trl"):
        with pytest.raises(ValueError, match=r"'q_prj' name\(s\) no linear layer.*k_proj.*q_proj.*did you mean 'q_proj'"):
            lora_sft(str(tiny_model_dir), str(tmp_path / "not-read-yet.jsonl"), str(out), backend=backend,
                     target_modules=["q_prj", "v_proj"])
    assert not out.exists()
