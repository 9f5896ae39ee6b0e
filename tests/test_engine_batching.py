"""Engine components without a training run: step planning, packing, the exact loss split, the schedule."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from training_hub.engine.batching import (IGNORE_INDEX, check_sample_lengths, pack, pack_into_micro_batches,
                                          plan_epoch)
from training_hub.engine.attention import NAME as ATTENTION_NAME
from training_hub.engine.attention import use_packed_attention
from training_hub.engine.loss import packed_logits, step_loss_and_backward, token_loss_sum
from training_hub.engine.schedule import build_scheduler, lr_factor


def _random_model(seed: int = 0, sliding_window: int | None = None):
    """A tiny random Qwen2 built from a config (no tokenizer needed), fp32, SDPA attention."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    window = dict(use_sliding_window=True, sliding_window=sliding_window, max_window_layers=0) if sliding_window else {}
    config = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         attn_implementation="sdpa", **window)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).float()


def _random_samples(n: int, seed: int = 0):
    """Samples of varied length; the first third of each is a 'prompt' without loss."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        length = int(torch.randint(5, 40, (1,), generator=g))
        ids = torch.randint(0, 300, (length,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (length // 3) + ids[length // 3:]
        samples.append((ids, labels))
    return samples


# ------------------------------------------------------------------------------------------------ planning

def test_plan_respects_batch_size_and_token_budget():
    lengths = [int(x) for x in torch.randint(1, 100, (103,), generator=torch.Generator().manual_seed(1))]
    steps = plan_epoch(lengths, effective_batch_size=10, max_tokens_per_gpu=120, seed=3, epoch=0)
    assert len(steps) == math.ceil(103 / 10)
    assert [s.num_samples for s in steps] == [10] * 10 + [3]
    seen = sorted(i for s in steps for mb in s.micro_batches for i in mb)
    assert seen == list(range(103))  # every sample exactly once per epoch
    for s in steps:
        assert all(sum(lengths[i] for i in mb) <= 120 for mb in s.micro_batches)
        assert s.num_tokens == sum(lengths[i] for mb in s.micro_batches for i in mb)


def test_plan_is_deterministic_per_seed_and_epoch():
    lengths = list(range(1, 60))
    plan = lambda seed, epoch: plan_epoch(lengths, effective_batch_size=8, max_tokens_per_gpu=100,  # noqa: E731
                                          seed=seed, epoch=epoch)
    assert plan(0, 0) == plan(0, 0)
    assert plan(0, 0) != plan(0, 1)
    assert plan(0, 0) != plan(1, 0)


def test_first_fit_decreasing_uses_few_micro_batches():
    assert len(pack_into_micro_batches(list(range(6)), [60, 40, 60, 40, 50, 50], 100)) == 3


def test_sample_longer_than_budget_is_a_clear_error_when_planning():
    with pytest.raises(ValueError, match=r"longer than max_tokens_per_gpu=64 \(longest: sample 2 with 65 tokens\)"):
        plan_epoch([10, 64, 65, 3], effective_batch_size=2, max_tokens_per_gpu=64, seed=0, epoch=0)
    check_sample_lengths([64, 64], 64)  # exactly the budget fits


def test_pack_restarts_positions_and_shifts_labels_per_sample():
    row = pack([[1, 2, 3], [4, 5]], [[IGNORE_INDEX, 2, 3], [4, 5]])
    assert row["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert row["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # token t predicts t+1 of the same sample; the last token of a sample predicts nothing (no cross-sample target)
    assert row["targets"].tolist() == [[2, 3, IGNORE_INDEX, 5, IGNORE_INDEX]]
    assert row["loss_mask"].tolist() == [[True, True, False, True, False]]


# ------------------------------------------------------------------------------------ attention and the loss

@pytest.mark.parametrize("per_sample_attention,window", [(True, None), (False, None), (True, 6)],
                         ids=["packed_sdpa", "sdpa_position_mask", "packed_sdpa_sliding_window"])
def test_packed_sample_logits_equal_its_logits_alone(per_sample_attention, window):
    """Both ways the engine runs a packed row; the reference runs each sample alone with plain SDPA."""
    model = _random_model(sliding_window=window).eval()
    if per_sample_attention:
        assert use_packed_attention(model)
        assert model.config._attn_implementation == ATTENTION_NAME
    samples = _random_samples(4, seed=5)
    row = pack([s[0] for s in samples], [s[1] for s in samples])
    with torch.no_grad():
        packed = packed_logits(model, row, torch.ones_like(row["loss_mask"]))  # the engine's forward
        assert packed.shape == (row["input_ids"].shape[1], 300)
        offset, loss_alone = 0, 0.0
        for ids, labels in samples:
            model.set_attn_implementation("sdpa")
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            model.set_attn_implementation(ATTENTION_NAME if per_sample_attention else "sdpa")
            torch.testing.assert_close(packed[offset:offset + len(ids)], alone, atol=1e-5, rtol=0)
            offset += len(ids)
            loss_alone += float(torch.nn.functional.cross_entropy(alone[:-1], torch.tensor(labels[1:]),
                                                                  reduction="sum"))
        assert float(token_loss_sum(model, row)) == pytest.approx(loss_alone, rel=1e-6)


def _step_gradients(model, samples, max_tokens: int):
    model.zero_grad(set_to_none=True)
    lengths = [len(s[0]) for s in samples]
    micro_batches = pack_into_micro_batches(list(range(len(samples))), lengths, max_tokens)
    rows = [pack([samples[i][0] for i in mb], [samples[i][1] for i in mb]) for mb in micro_batches]
    loss, targets = step_loss_and_backward(model, rows, autocast=contextlib.nullcontext)
    return len(rows), loss, targets, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("per_sample_attention", [True, False], ids=["packed_sdpa", "sdpa_position_mask"])
def test_one_step_same_gradients_in_one_micro_batch_or_many(per_sample_attention):
    model = _random_model(seed=1)
    if per_sample_attention:
        assert use_packed_attention(model)
    samples = _random_samples(12, seed=2)
    total = sum(len(s[0]) for s in samples)
    n_one, loss_one, targets_one, grads_one = _step_gradients(model, samples, max_tokens=total)
    n_many, loss_many, targets_many, grads_many = _step_gradients(model, samples, max_tokens=45)
    assert n_one == 1 and n_many >= 6
    assert targets_one == targets_many
    assert loss_many == pytest.approx(loss_one, abs=1e-5)
    for name in grads_one:
        torch.testing.assert_close(grads_many[name], grads_one[name], atol=1e-5, rtol=1e-4, msg=name)
    # ...and they are the gradients of the plain mean token loss over the step, computed sample by sample
    model.zero_grad(set_to_none=True)
    losses = []
    for ids, labels in samples:
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        losses.append(torch.nn.functional.cross_entropy(logits, torch.tensor(labels[1:]), reduction="none"))
    all_losses = torch.cat(losses)
    targets = torch.cat([torch.tensor(labels[1:]) for _, labels in samples])
    reference = all_losses[targets != IGNORE_INDEX].mean()
    reference.backward()
    assert float(reference.detach()) == pytest.approx(loss_one, abs=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads_one[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


# --------------------------------------------------------------------------------------------- the schedule

@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
def test_schedule_warmup_then_shape(name):
    f = [lr_factor(s, name=name, warmup_steps=4, total_steps=14) for s in range(15)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4] == pytest.approx(1.0)
    if name == "constant":
        assert f[14] == pytest.approx(1.0)
    else:
        assert f[14] == pytest.approx(0.0, abs=1e-12)
        assert all(a >= b for a, b in zip(f[4:], f[5:]))
    if name == "cosine":
        assert f[9] == pytest.approx(0.5)
    if name == "linear":
        assert f[9] == pytest.approx(0.5)


def test_scheduler_min_lr_ratio_and_unknown_option():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    sched = build_scheduler(opt, name="cosine", warmup_steps=0, total_steps=10,
                            scheduler_kwargs={"min_lr_ratio": 0.1})
    for _ in range(10):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="min_lr_rate"):
        build_scheduler(opt, name="cosine", warmup_steps=0, total_steps=10, scheduler_kwargs={"min_lr_rate": 0.1})
