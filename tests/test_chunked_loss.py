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
