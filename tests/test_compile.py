"""torch_compile: regional compilation of the decoder layers, checked against eager, without per-step recompiles."""

from __future__ import annotations

import logging
import random

import pytest
import torch

from training_hub.engine import compile as compiled


def _model(model_dir):
    from transformers import AutoModelForCausalLM

    from training_hub.engine.attention import use_packed_attention

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    assert use_packed_attention(model)  # per-sample SDPA: the path with the host list of sample offsets
    return model.train()


def _rows(vocab: int, counts=(3, 5, 2, 4)):
    """Packed rows of different lengths and numbers of samples."""
    from training_hub.engine.batching import pack

    rng = random.Random(1)
    for n in counts:
        samples = [[rng.randrange(vocab) for _ in range(rng.randint(4, 40))] for _ in range(n)]
        yield pack(samples, samples, device="cpu")


def _loss_and_grads(model, row):
    from training_hub.engine.loss import token_loss_sum

    loss = token_loss_sum(model, row)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_compiled_layers_match_eager_and_compile_once_for_all_row_shapes(tiny_model_dir):
    model = _model(tiny_model_dir)
    choice = compiled.use_compiled_layers(model, None)  # fp32: tolerance 1e-4
    assert choice, choice.reason
    assert choice.compiled == model.config.num_hidden_layers and choice.error <= 1e-4
    graphs = compiled.recompiles()  # the self-check compiled the forward and backward graphs
    for row in _rows(model.config.vocab_size):
        loss, grads = _loss_and_grads(model, row)
        with torch.compiler.set_stance("force_eager"):
            eager_loss, eager_grads = _loss_and_grads(model, row)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
        # fp32 sums in another order (fused kernels, thread count): equal to rounding relative to the largest grad
        scale = eager_grads.abs().max().item()
        assert (grads - eager_grads).abs().max().item() <= 1e-4 * scale
    assert compiled.recompiles() == graphs  # new lengths and sample counts: no new graphs
    compiled.eager(model, compiled.decoder_layers(model))
    assert all(layer._compiled_call_impl is None for layer in compiled.decoder_layers(model))


class _OffWhenCompiled(torch.nn.Module):
    """Wraps a module; scales its output by 1.01 only inside a compiled graph (a miscompilation stand-in)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        return out * 1.01 if torch.compiler.is_compiling() else out


def test_a_compiled_model_that_differs_from_eager_trains_eager(tiny_model_dir, caplog):
    model = _model(tiny_model_dir)
    layer = compiled.decoder_layers(model)[0]
    layer.mlp = _OffWhenCompiled(layer.mlp)
    with caplog.at_level(logging.WARNING, logger="training_hub.engine.compile"):
        choice = compiled.use_compiled_layers(model, None, backend="eager")  # graph capture only: fast
    assert not choice and choice.error > 1e-3
    assert "compiled and eager differ" in choice.reason and "stays eager" in caplog.text
    assert all(layer._compiled_call_impl is None for layer in compiled.decoder_layers(model))
    assert not hasattr(model, "_training_hub_bounds_hook")


def test_a_compile_failure_leaves_the_model_eager(tiny_model_dir, monkeypatch):
    model = _model(tiny_model_dir)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compiled, "compiled_error", broken)
    choice = compiled.use_compiled_layers(model, torch.bfloat16)
    assert not choice and choice.reason == "RuntimeError: no C++ compiler"
    assert all(layer._compiled_call_impl is None for layer in compiled.decoder_layers(model))


def test_not_with_gradient_checkpointing_which_would_run_the_layers_uncompiled(tiny_model_dir):
    from training_hub.engine.model import enable_checkpointing

    model = _model(tiny_model_dir)
    enable_checkpointing(model)
    choice = compiled.use_compiled_layers(model, None)
    assert not choice and "gradient_checkpointing" in choice.reason
    assert all(layer._compiled_call_impl is None for layer in compiled.decoder_layers(model))


def test_off_unless_asked_and_not_under_fsdp2(tiny_model_dir):
    from types import SimpleNamespace

    model = _model(tiny_model_dir)
    assert not compiled.compile_model(model, SimpleNamespace(torch_compile=False), torch.device("cpu"))
    choice = compiled.compile_model(model, SimpleNamespace(torch_compile=True), torch.device("cpu"), fsdp=True)
    assert not choice and "FSDP2" in choice.reason
    assert all(layer._compiled_call_impl is None for layer in compiled.decoder_layers(model))


def test_other_backends_and_grpo_refuse_it(tiny_model_dir, tmp_path):
    from training_hub.backends.common import native_only_problems
    from training_hub.backends.grpo import NativeGRPOBackend
    from training_hub.config.grpo import GRPOConfig
    from training_hub.config.algorithms import SFTConfig

    sft_config = SFTConfig(model_path="m", data_path="d.jsonl", ckpt_output_dir="o", torch_compile=True)
    assert any(p.startswith("torch_compile:") for p in native_only_problems(sft_config))
    grpo_config = GRPOConfig(model_path="m", ckpt_output_dir="o", torch_compile=True)
    assert any(p.startswith("torch_compile:") for p in NativeGRPOBackend.refusals(grpo_config, {"torch_compile"}))


@pytest.mark.slow
def test_sft_with_torch_compile_trains_as_eager_does(tiny_model_dir, tmp_path, caplog):
    from training_hub import sft
    from training_hub.tiny import demo_data_path

    common = dict(max_seq_len=128, effective_batch_size=8, max_steps=3, learning_rate=1e-3, disable_progress_bar=True,
                  dtype="float32", save_final_checkpoint=False)
    eager_run = sft(str(tiny_model_dir), str(demo_data_path()), str(tmp_path / "eager"), **common)
    with caplog.at_level(logging.INFO, logger="training_hub.engine.compile"):
        compiled_run = sft(str(tiny_model_dir), str(demo_data_path()), str(tmp_path / "compiled"), torch_compile=True,
                           **common)
    assert "decoder layers compiled" in caplog.text
    assert compiled_run.metrics["final_loss"] == pytest.approx(eager_run.metrics["final_loss"], rel=1e-4)
