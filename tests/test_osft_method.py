"""OSFT on the tiny model, fp32: the frozen subspace survives real AdamW steps, and only because of the projections.

The invariant (issue 8, 4a): for every target, ||W' V_h - U_h diag(S_h)|| / ||S_h|| < 1e-4, where U_h, S_h, V_h come
from a fresh SVD of the ORIGINAL weight (read back from the model folder) and W' is the dense weight of the
checkpoint written with ``save_pretrained(state_dict=dense_state_dict(model))`` and loaded back by transformers.
"""

from __future__ import annotations

import pytest
import torch

from training_hub.osft_core import (apply_osft, dense_state_dict, frozen_rank, osft_modules, osft_trainable_parameters,
                               project_gradients, project_parameters)

BOUND = 1e-4
RATIO = 0.5


def _load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _train(model, *, steps=6, lr=1e-2, project_grads=True, project_params=True, seed=0):
    """A small hand-written AdamW loop on random token batches."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (4, 24), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if project_grads:
            project_gradients(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if project_params:
            project_parameters(model)
        losses.append(loss.item())
    model.eval()
    return losses


def _invariant_errors(original: dict, trained: dict, ratio: float) -> dict[str, float]:
    """||W' V_h - U_h diag(S_h)|| / ||S_h|| per target, with the SVD taken from the original weights."""
    errors = {}
    for key, w0 in original.items():
        U, S, Vh = torch.linalg.svd(w0.to(torch.float32), full_matrices=False)
        k = frozen_rank(min(w0.shape), ratio)
        U_h, S_h, V_h = U[:, :k], S[:k], Vh[:k].T
        errors[key] = ((trained[key].to(torch.float32) @ V_h - U_h * S_h).norm() / S_h.norm()).item()
    return errors


@pytest.fixture(scope="module")
def original(tiny_model_dir):
    model = _load(tiny_model_dir)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _target_weights(summary) -> list[str]:
    return [f"{name}.weight" for name in summary["targets"]]


def test_decompose_then_reconstruct_is_exact(tiny_model_dir, original):
    model = _load(tiny_model_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    summary = apply_osft(model, unfreeze_rank_ratio=RATIO)
    assert len(summary["targets"]) == 7 * model.config.num_hidden_layers
    for mode in ("dense", "factored"):
        for module in osft_modules(model).values():
            module.forward_mode = mode
        with torch.no_grad():
            assert (model(input_ids=ids).logits - ref).abs().max().item() < 1e-5, mode
    dense = dense_state_dict(model)
    assert list(dense) == list(original)  # same keys, same order as the undecomposed model
    for key, value in original.items():
        assert dense[key].dtype == value.dtype
        assert (dense[key] - value).abs().max().item() < 1e-5, key


def test_invariant_holds_after_projected_adamw_steps_and_saved_checkpoint(tiny_model_dir, original, tmp_path):
    model = _load(tiny_model_dir)
    summary = apply_osft(model, unfreeze_rank_ratio=RATIO)
    losses = _train(model)
    assert all(torch.isfinite(torch.tensor(losses)))

    out = tmp_path / "osft_ckpt"
    model.save_pretrained(out, state_dict=dense_state_dict(model))
    from transformers import AutoModelForCausalLM

    reloaded, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    # tied embeddings survive: one tensor, equal to the trained embedding
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item() < 1e-5

    trained = reloaded.state_dict()
    targets = _target_weights(summary)
    errors = _invariant_errors({k: original[k] for k in targets}, trained, RATIO)
    assert max(errors.values()) < BOUND, errors
    # (c) the targets did change, and so did the non-targets (they train as in SFT by default)
    for key in targets:
        change = ((trained[key] - original[key]).norm() / original[key].norm()).item()
        assert change > 1e-2, (key, change)
    for key in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight",
                "model.layers.0.self_attn.q_proj.bias"):
        assert not torch.equal(trained[key], original[key]), key


def test_negative_controls_break_the_invariant(tiny_model_dir, original):
    """The bound can fail: without projections, and with plain dense training, the frozen directions move."""
    targets = None
    results = {}
    for arm, kwargs in [("no projection", dict(project_grads=False, project_params=False)),
                        ("gradient projection only", dict(project_grads=True, project_params=False))]:
        model = _load(tiny_model_dir)
        targets = _target_weights(apply_osft(model, unfreeze_rank_ratio=RATIO))
        _train(model, **kwargs)
        results[arm] = max(_invariant_errors({k: original[k] for k in targets}, dense_state_dict(model), RATIO)
                           .values())
    model = _load(tiny_model_dir)  # plain SFT of the same weights
    _train(model, project_grads=False, project_params=False)
    results["plain SFT"] = max(_invariant_errors({k: original[k] for k in targets}, model.state_dict(), RATIO)
                               .values())
    assert results["no projection"] > 100 * BOUND, results
    assert results["plain SFT"] > 100 * BOUND, results
    # AdamW's per-element scaling leaks a projected gradient out of the allowed subspace
    assert results["gradient projection only"] > BOUND, results


def test_freeze_non_targets_trains_only_the_low_factors(tiny_model_dir, original):
    model = _load(tiny_model_dir)
    summary = apply_osft(model, unfreeze_rank_ratio=0.25, freeze_non_targets=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in osft_trainable_parameters(model)}
    assert summary["trainable_parameters"] == summary["osft_trainable_parameters"] == sum(p.numel() for p in trainable)
    _train(model, steps=4)
    dense = dense_state_dict(model)
    targets = set(_target_weights(summary))
    for key, value in original.items():
        if key in targets:
            assert not torch.equal(dense[key], value), key
        else:
            assert torch.equal(dense[key], value), key  # embeddings, norms, biases untouched
    assert max(_invariant_errors({k: original[k] for k in targets}, dense, 0.25).values()) < BOUND


def test_every_direction_trains_at_ratio_one(tiny_model_dir, original):
    model = _load(tiny_model_dir)
    summary = apply_osft(model, unfreeze_rank_ratio=1.0)
    assert set(summary["frozen_rank"].values()) == {0}
    for module in osft_modules(model).values():
        assert module.U_high.shape[1] == 0 and module.U_low.shape[1] == min(module.in_features, module.out_features)
    _train(model, steps=2)
    dense = dense_state_dict(model)
    for key in _target_weights(summary):
        assert not torch.equal(dense[key], original[key]), key


def test_tiny_ratio_leaves_one_direction_that_trains(tiny_model_dir, original):
    model = _load(tiny_model_dir)
    summary = apply_osft(model, unfreeze_rank_ratio=1e-6)
    assert all(k == summary["rank"][name] - 1 for name, k in summary["frozen_rank"].items())
    _train(model, steps=3)
    dense = dense_state_dict(model)
    targets = _target_weights(summary)
    assert max(_invariant_errors({k: original[k] for k in targets}, dense, 1e-6).values()) < BOUND
    for key in targets:
        assert not torch.equal(dense[key], original[key]), key


def test_llama_architecture(tmp_path):
    """No q/k/v biases, a different family: defaults resolve from the config and the invariant holds."""
    from training_hub.tiny import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "llama", arch="llama", hidden_size=48, num_heads=4, num_kv_heads=2)
    model = _load(model_dir)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    summary = apply_osft(model, unfreeze_rank_ratio=0.3)
    _train(model, steps=3)
    targets = _target_weights(summary)
    assert len(targets) == 7 * model.config.num_hidden_layers
    errors = _invariant_errors({k: original[k] for k in targets}, dense_state_dict(model), 0.3)
    assert max(errors.values()) < BOUND, errors
