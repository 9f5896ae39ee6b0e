"""The chunked output loss is the plain loss: same value and gradients, without the full logits at once."""

from __future__ import annotations

import pytest
import torch

from training_hub.engine import loss as loss_module
from training_hub.engine.batching import pack


def test_chunked_output_loss_equals_the_plain_loss_and_its_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    plain = torch.nn.functional.cross_entropy(hidden @ weight.T + bias, targets, reduction="sum")
    want = torch.autograd.grad(plain, (hidden, weight, bias))
    chunked = loss_module.chunked_output_loss(hidden, weight, bias, targets, chunk=5)
    got = torch.autograd.grad(chunked, (hidden, weight, bias))
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-6)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-6)


def test_a_model_step_gives_the_same_loss_and_gradients_chunked(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rng = torch.Generator().manual_seed(1)
    ids = [torch.randint(5, 200, (n,), generator=rng).tolist() for n in (23, 31, 17)]
    labels = [[-100] * 5 + seq[5:] for seq in ids]
    row = pack(ids, labels, device=torch.device("cpu"))

    def run(limit):
        monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", limit)
        model.zero_grad()
        value = loss_module.token_loss_sum(model, row)
        value.backward()
        return value.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_loss, plain_grads = run(2**40)  # never chunks
    calls = []
    real = loss_module.chunked_output_loss
    monkeypatch.setattr(loss_module, "chunked_output_loss", lambda *a, **k: calls.append(k["chunk"]) or real(*a, **k))
    chunked_loss, chunked_grads = run(model.config.vocab_size * 8)  # 8 positions per chunk
    assert calls == [8]
    assert chunked_loss == pytest.approx(plain_loss, rel=1e-6)
    for name, grad in plain_grads.items():  # fp32 sums in another order: equal to rounding
        scale = grad.abs().max().item()
        assert (chunked_grads[name] - grad).abs().max().item() <= 1e-5 * scale + 1e-8, name
    assert type(model.get_output_embeddings()).forward is torch.nn.Linear.forward  # the head is itself again
    assert "forward" not in vars(model.get_output_embeddings())


# ------------------------------------------------------------------------------------------- use_liger

def test_use_liger_without_cuda_or_liger_keeps_the_chunked_loss(caplog):
    import logging

    assert loss_module.fused_head_loss(False, torch.device("cuda")) is None
    with caplog.at_level(logging.INFO, logger=loss_module.__name__):
        assert loss_module.fused_head_loss(True, torch.device("cpu")) is None
    assert "CUDA only" in caplog.text


def _fake_liger(monkeypatch, calls: list):
    """A stand-in for liger-kernel's documented functional API (this machine has no CUDA for the real kernel):
    ``liger_fused_linear_cross_entropy(input, weight, target, bias, reduction=..., accum_dtype=...)``."""
    import importlib.machinery
    import sys
    import types

    def liger_fused_linear_cross_entropy(input, weight, target, bias=None, ce_weight=None, ignore_index=-100,
                                         lse_square_scale=0.0, label_smoothing=0.0, reduction="mean", softcap=None,
                                         return_z_loss=False, accum_dtype=None):
        assert input.dtype == weight.dtype  # the kernel takes one dtype
        calls.append({"rows": input.shape[0], "reduction": reduction, "accum_dtype": accum_dtype})
        logits = torch.nn.functional.linear(input, weight, bias).float()
        return torch.nn.functional.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)

    modules = {name: types.ModuleType(name) for name in
               ("liger_kernel", "liger_kernel.transformers", "liger_kernel.transformers.functional")}
    for name, module in modules.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    modules["liger_kernel.transformers.functional"].liger_fused_linear_cross_entropy = liger_fused_linear_cross_entropy


def test_use_liger_on_cuda_computes_the_output_loss_in_liger_with_the_same_value_and_gradients(
        tiny_model_dir, monkeypatch):
    """The wiring: hidden states at the loss positions only, the head's weight in their dtype, a summed loss, fp32
    accumulation; value and gradients equal to the engine's own loss."""
    from transformers import AutoModelForCausalLM

    calls: list = []
    _fake_liger(monkeypatch, calls)
    head_loss = loss_module.fused_head_loss(True, torch.device("cuda"))  # a device object; nothing runs on it
    assert head_loss is not None
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rng = torch.Generator().manual_seed(2)
    ids = [torch.randint(5, 200, (n,), generator=rng).tolist() for n in (19, 26)]
    labels = [[-100] * 6 + seq[6:] for seq in ids]
    rows = [pack(ids, labels, device=torch.device("cpu"))]

    def step(**kwargs):
        model.zero_grad()
        loss, tokens = loss_module.step_loss_and_backward(model, rows, lambda: torch.autocast("cpu", torch.bfloat16),
                                                          **kwargs)
        return loss, tokens, {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_loss, plain_tokens, plain_grads = step()
    liger_loss, liger_tokens, liger_grads = step(head_loss=head_loss)
    assert calls == [{"rows": rows[0]["num_targets"], "reduction": "sum", "accum_dtype": torch.float32}]
    assert liger_tokens == plain_tokens
    assert liger_loss == pytest.approx(plain_loss, rel=1e-6)
    for name, grad in plain_grads.items():
        assert torch.allclose(liger_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_use_liger_takes_effect_only_with_cuda_and_liger_kernel_and_not_for_native_dpo(monkeypatch):
    """Where it does not, the backend warns that use_liger is ignored (``config.upstream.warn_ignored``)."""
    from training_hub.backends.native import NativeDPOBackend, NativeSFTBackend
    from training_hub.config import upstream

    monkeypatch.setattr(upstream, "_cuda", lambda: True)
    assert not upstream.handled("use_liger", NativeSFTBackend)  # liger-kernel is not installed here
    _fake_liger(monkeypatch, [])
    assert upstream.handled("use_liger", NativeSFTBackend)
    assert not upstream.handled("use_liger", NativeDPOBackend)  # DPO's loss has no Liger kernel here
    monkeypatch.setattr(upstream, "_cuda", lambda: False)
    assert not upstream.handled("use_liger", NativeSFTBackend)
