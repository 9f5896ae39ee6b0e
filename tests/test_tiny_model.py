"""The offline tiny model (training_hub.tiny) and the bundled demo chat data."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from training_hub.tiny import CHATML_TEMPLATE, demo_data_path, make_tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")


@pytest.fixture(scope="module")
def tok(qwen_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_dir)


def _expected_params(vocab, h, layers, heads, kv_heads, inter, qkv_bias):
    """Parameter count of a Qwen2/Llama decoder with tied embeddings, written out from the architecture."""
    kv_dim = h // heads * kv_heads
    attn = h * h + 2 * h * kv_dim + h * h + ((h + 2 * kv_dim) if qkv_bias else 0)
    mlp = 3 * h * inter
    return vocab * h + layers * (attn + mlp + 2 * h) + h


def _assistant_spans(tok, messages):
    """Texts of the contiguous runs of tokens that the assistant mask marks."""
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    spans, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tok.decode(s) for s in spans]


# ---------------------------------------------------------------------------------------------- the model folder


def test_folder_loads_with_plain_transformers(qwen_dir, tok):
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    assert (qwen_dir / "model.safetensors").is_file()
    assert (qwen_dir / "generation_config.json").is_file()
    assert not list(qwen_dir.parent.glob(".*tmp-*")), "temporary build folder left behind"
    model = AutoModelForCausalLM.from_pretrained(qwen_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tok)
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert tok.model_max_length == model.config.max_position_embeddings == 2048

    ids = tok("What is the capital of France?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()

    gen = GenerationConfig.from_pretrained(qwen_dir)
    assert gen.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>") == model.config.eos_token_id
    assert gen.pad_token_id == tok.pad_token_id == model.config.pad_token_id
    assert gen.do_sample is False


def test_parameter_count_of_defaults(qwen_dir, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(qwen_dir)
    n = sum(p.numel() for p in model.parameters())
    assert len(tok) == 1024
    assert model.config.intermediate_size == 256  # None means 4 * hidden_size
    assert n == _expected_params(1024, 64, 2, 4, 2, 256, qkv_bias=True)
    assert 150_000 < n < 250_000


def test_llama_arch(llama_dir, qwen_dir, tok):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    llama_tok = AutoTokenizer.from_pretrained(llama_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    n = sum(p.numel() for p in model.parameters())
    assert n == _expected_params(len(llama_tok), 64, 2, 4, 2, 256, qkv_bias=False)
    # transformers reloads the two folders with different tokenizer classes (Qwen2Tokenizer rebuilds the
    # pre-tokenizer); both must still tokenize exactly like each other.
    text = "What is 12 plus 30?\n  Héllo, wörld! <think> 日本語 e\u0301"
    assert llama_tok(text)["input_ids"] == tok(text)["input_ids"]
    assert llama_tok.decode(llama_tok(text)["input_ids"]) == "What is 12 plus 30?\n  Héllo, wörld! <think> 日本語 é"
    assert llama_tok.chat_template == tok.chat_template == CHATML_TEMPLATE


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    import torch
    from safetensors.torch import load_file

    a = load_file(make_tiny_model(tmp_path / "a", seed=3) / "model.safetensors")
    b = load_file(make_tiny_model(tmp_path / "b", seed=3) / "model.safetensors")
    c = load_file(make_tiny_model(tmp_path / "c", seed=4) / "model.safetensors")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_building_does_not_touch_the_global_rng(tmp_path):
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny_model(tmp_path / "m", seed=7)
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------------------------------------- tokenizer + template


def test_special_tokens(tok):
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>"
    assert tok.pad_token_id != tok.eos_token_id
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert len(tok(special)["input_ids"]) == 1, special
        assert tok.decode(tok(special)["input_ids"]) == special


def test_any_text_round_trips(tok):
    for text in ["Spell cat backwards.", "x = {'a': [1, 2]}  # ok\n\ttab", "naïve café ✓ 🙂", "~`^|\\"]:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
    # the corpus taught it the demo vocabulary: a common word is one token, not a run of bytes
    assert len(tok(" capital")["input_ids"]) == 1


def test_chat_template_renders_chatml(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    tool = tok.apply_chat_template([{"role": "tool", "content": "42"}], tokenize=False)
    assert tool == "<|im_start|>tool\n42<|im_end|>\n"


def test_chat_template_renders_reasoning(tok):
    messages = [
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "4.", "reasoning_content": "Two and two."},
    ]
    assert tok.apply_chat_template(messages, tokenize=False).endswith(
        "<|im_start|>assistant\n<think>\nTwo and two.\n</think>\n4.<|im_end|>\n"
    )


def test_chat_template_rejects_unknown_role(tok):
    with pytest.raises(Exception, match="Unknown chat role: robot"):
        tok.apply_chat_template([{"role": "robot", "content": "hi"}], tokenize=False)


def test_assistant_mask_covers_exactly_assistant_content_and_im_end(tok):
    messages = [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "What is the capital of Peru?"},
        {"role": "assistant", "content": "Lima."},
        {"role": "user", "content": "And of Cuba?"},
        {"role": "assistant", "content": "Havana.", "reasoning_content": "Cuba -> Havana"},
    ]
    assert _assistant_spans(tok, messages) == [
        "Lima.<|im_end|>",
        "<think>\nCuba -> Havana\n</think>\nHavana.<|im_end|>",
    ]


def test_generation_template_is_accepted_by_trl(tok):
    chat_template_utils = pytest.importorskip("trl.chat_template_utils")
    assert chat_template_utils.has_generation_markers(tok.chat_template)
    assert chat_template_utils.is_chat_template_stop_token_trained(tok)


# ---------------------------------------------------------------------------------------------- arguments


def test_bad_arguments_are_all_reported(tmp_path):
    with pytest.raises(ValueError) as err:
        make_tiny_model(tmp_path / "m", arch="gpt9", hidden_size=60, num_heads=8, num_kv_heads=3, vocab_size=100)
    message = str(err.value)
    for part in ("arch", "hidden_size (60)", "num_heads (8)", "vocab_size"):
        assert part in message
    assert not (tmp_path / "m").exists()


def test_non_empty_out_dir_needs_overwrite(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="overwrite=True"):
        make_tiny_model(out)
    assert (out / "keep.txt").exists()
    make_tiny_model(out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert (out / "model.safetensors").is_file()


def test_custom_corpus_and_sizes(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = make_tiny_model(tmp_path / "m", corpus=["hello world"] * 10, hidden_size=32, num_layers=1,
                          num_heads=2, num_kv_heads=1, intermediate_size=48)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert 259 < len(tok) < 300  # 256 bytes + 3 specials + the few merges "hello world" allows
    assert model.config.vocab_size == len(tok)
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.intermediate_size) == (32, 1, 48)
    assert tok.decode(tok("Zebra!")["input_ids"]) == "Zebra!"


def test_import_is_cheap():
    code = ("import sys, training_hub.tiny; "
            "print(sorted(m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------------- demo data


def test_demo_data_is_valid_short_chat():
    lines = demo_data_path().read_text(encoding="utf-8").splitlines()
    assert 300 <= len(lines) <= 400
    with_system = multi_turn = 0
    for n, line in enumerate(lines, 1):
        messages = json.loads(line)["messages"]
        roles = [m["role"] for m in messages]
        if roles[0] == "system":
            with_system += 1
            roles = roles[1:]
        assert roles and roles == ["user", "assistant"] * (len(roles) // 2), f"line {n}: {roles}"
        multi_turn += len(roles) > 2
        for m in messages:
            assert isinstance(m["content"], str) and m["content"].strip(), f"line {n}"
            if m["role"] == "assistant":
                assert len(m["content"]) <= 20, f"line {n}: answer too long: {m['content']!r}"
    assert with_system >= 5
    assert multi_turn >= 5
    assert len(set(lines)) == len(lines), "duplicate samples"


def test_demo_data_matches_its_generator():
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "scripts" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    expected = [json.dumps(s, ensure_ascii=True) for s in module.make_samples()]
    assert demo_data_path().read_text(encoding="utf-8").splitlines() == expected
