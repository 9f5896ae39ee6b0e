"""OSFT building blocks: rank arithmetic and edge values, target selection and its errors, the layer's gradients,
the projections."""

from __future__ import annotations

import math
import types

import pytest
import torch
from torch import nn

from training_hub.osft_core import (OSFTLinear, apply_osft, default_target_patterns, find_targets, frozen_rank,
                               osft_modules, project_gradients, project_parameters)
from training_hub.osft_core.project import project_out


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(12, 12, bias=True)
        self.self_attn.q_proj_extra = nn.Linear(12, 12, bias=False)
        self.mlp = nn.Module()
        self.mlp.down_proj = nn.Linear(20, 12, bias=False)
        self.mlp.up_proj = nn.Linear(12, 20, bias=False)
        self.norm = nn.LayerNorm(12)

    def forward(self, x):
        x = self.norm(x + self.self_attn.q_proj(x) + self.self_attn.q_proj_extra(x))
        return x + self.mlp.down_proj(torch.relu(self.mlp.up_proj(x)))


class Toy(nn.Module):
    """Two blocks and a config whose model_type is given."""

    def __init__(self, model_type="llama"):
        super().__init__()
        torch.manual_seed(0)
        self.config = types.SimpleNamespace(model_type=model_type, architectures=["ToyForCausalLM"])
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


# ---- rank arithmetic and unfreeze_rank_ratio edge values ----

@pytest.mark.parametrize("rank, ratio, k", [
    (64, 0.5, 32), (64, 0.25, 48), (64, 1.0, 0), (64, 1, 0), (10, 0.9, 1), (10, 0.3, 7), (10, 0.7, 3),
    (12, 0.1, 10), (64, 1e-9, 63), (1, 0.5, 0),
])
def test_frozen_rank_is_exact_floor_of_the_decimal_ratio(rank, ratio, k):
    assert frozen_rank(rank, ratio) == k
    assert frozen_rank(rank, ratio) < rank  # at least one direction always trains


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.0000001, 1.5, 2, float("nan"), float("inf"), True, "0.5", None])
def test_bad_ratio_is_a_value_error(bad):
    with pytest.raises(ValueError, match="unfreeze_rank_ratio"):
        frozen_rank(8, bad)
    model = Toy()
    with pytest.raises(ValueError, match="unfreeze_rank_ratio"):
        apply_osft(model, unfreeze_rank_ratio=bad)
    assert not osft_modules(model)  # nothing was changed


def test_layer_refuses_a_frozen_rank_that_leaves_nothing_to_train():
    with pytest.raises(ValueError, match="at least one direction must train"):
        OSFTLinear.from_linear(nn.Linear(8, 6), 6)


def test_summary_counts_and_shapes():
    model = Toy()
    summary = apply_osft(model, unfreeze_rank_ratio=0.25, target_patterns=["self_attn.q_proj", "mlp.down_proj"])
    assert summary["targets"] == ["layers.0.self_attn.q_proj", "layers.0.mlp.down_proj",
                                  "layers.1.self_attn.q_proj", "layers.1.mlp.down_proj"]
    assert summary["frozen_rank"] == {name: 9 for name in summary["targets"]}  # floor(12 * 0.75)
    q = model.layers[0].self_attn.q_proj
    assert isinstance(q, OSFTLinear) and q.U_high.shape == (12, 9) and q.V_low.shape == (12, 3)
    down = model.layers[0].mlp.down_proj
    assert down.U_high.shape == (12, 9) and down.V_high.shape == (20, 9) and down.V_low.shape == (20, 3)
    assert not q.U_high.requires_grad and q.U_low.requires_grad and q.bias.requires_grad
    low = 2 * (3 * (12 + 1 + 12) + 3 * (12 + 1 + 20))
    assert summary["osft_trainable_parameters"] == low
    assert summary["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert isinstance(model.layers[0].self_attn.q_proj_extra, nn.Linear)  # whole-component matching


# ---- targets ----

def test_default_patterns_come_from_the_architecture():
    from transformers import LlamaConfig, Qwen2Config

    expected = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert default_target_patterns(Qwen2Config()) == expected
    assert default_target_patterns(LlamaConfig()) == expected
    assert default_target_patterns({"model_type": "mistral"}) == expected
    assert default_target_patterns({"model_type": "phi3"}) == ["self_attn.qkv_proj", "self_attn.o_proj",
                                                               "mlp.gate_up_proj", "mlp.down_proj"]
    assert default_target_patterns({"model_type": "qwen3_moe"}) == expected[:4]


def test_unknown_architecture_without_patterns_is_a_value_error():
    with pytest.raises(ValueError, match=r"no default target_patterns for model_type 'my_arch'.*pass target_patterns"):
        default_target_patterns({"model_type": "my_arch"})
    model = Toy("my_arch")
    with pytest.raises(ValueError, match="pass target_patterns"):
        apply_osft(model, unfreeze_rank_ratio=0.5)
    # ...and works once the patterns are given
    summary = apply_osft(model, unfreeze_rank_ratio=0.5, target_patterns=["mlp.up_proj"])
    assert summary["targets"] == ["layers.0.mlp.up_proj", "layers.1.mlp.up_proj"]


def test_pattern_matching_is_by_whole_name_components():
    model = Toy()
    assert find_targets(model, ["q_proj"]) == ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj"]
    assert find_targets(model, ["layers.1.self_attn.q_proj"]) == ["layers.1.self_attn.q_proj"]
    assert find_targets(model, ["self_attn.q_proj.weight"]) == ["layers.0.self_attn.q_proj",
                                                                "layers.1.self_attn.q_proj"]
    assert find_targets(model, ["down_proj", "q_proj_extra"]) == [
        "layers.0.self_attn.q_proj_extra", "layers.0.mlp.down_proj",
        "layers.1.self_attn.q_proj_extra", "layers.1.mlp.down_proj"]  # in module order
    # defaults (require_all=False) only need one pattern to match
    assert find_targets(model, ["up_proj", "gate_proj"], require_all=False) == ["layers.0.mlp.up_proj",
                                                                               "layers.1.mlp.up_proj"]


def test_patterns_matching_nothing_are_a_value_error_naming_them():
    model = Toy()
    with pytest.raises(ValueError, match=r"\['q_pro'\] match no nn.Linear.*layers\.0\.self_attn\.q_proj"):
        find_targets(model, ["q_pro"])
    with pytest.raises(ValueError, match=r"\['mlp.gate_proj'\] match no nn.Linear"):  # one typo among good ones
        apply_osft(model, unfreeze_rank_ratio=0.5, target_patterns=["self_attn.q_proj", "mlp.gate_proj"])
    with pytest.raises(ValueError, match=r"\['norm'\] match no nn.Linear"):  # a module that is not a Linear
        find_targets(model, ["norm"])
    with pytest.raises(ValueError, match="non-empty list"):
        find_targets(model, [])
    with pytest.raises(ValueError, match="list of strings"):
        find_targets(model, "q_proj")
    assert not osft_modules(model)


def test_tied_weight_and_second_application_are_refused():
    model = Toy()
    model.layers[1].self_attn.q_proj.weight = model.layers[0].self_attn.q_proj.weight
    with pytest.raises(ValueError, match="tied"):
        apply_osft(model, unfreeze_rank_ratio=0.5, target_patterns=["layers.0.self_attn.q_proj"])
    model = Toy()
    apply_osft(model, unfreeze_rank_ratio=0.5, target_patterns=["mlp.up_proj"])
    with pytest.raises(ValueError, match="already"):
        apply_osft(model, unfreeze_rank_ratio=0.5, target_patterns=["mlp.down_proj"])


# ---- the layer ----

@pytest.mark.parametrize("bias", [True, False])
def test_dense_forward_backward_matches_factored_and_passes_gradcheck(bias):
    torch.manual_seed(0)
    layer = OSFTLinear.from_linear(nn.Linear(7, 5, bias=bias).double(), 2)
    layer.U_high.requires_grad_(True)  # exercise the frozen-factor gradients of the custom backward too
    x = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    outputs, grads = {}, {}
    params = [p for p in layer.parameters() if p.requires_grad]
    for mode in ("dense", "factored"):
        layer.forward_mode = mode
        out = layer(x)
        outputs[mode] = out
        grads[mode] = torch.autograd.grad((out * torch.arange(5.0, dtype=torch.float64)).sum(), [x, *params])
    torch.testing.assert_close(outputs["dense"], outputs["factored"])
    for a, b in zip(grads["dense"], grads["factored"]):
        torch.testing.assert_close(a, b)
    layer.forward_mode = "dense"
    assert torch.autograd.gradcheck(lambda inp, *ps: layer(inp), (x, *params))


def test_auto_mode_picks_dense_for_many_tokens_and_factored_for_few():
    layer = OSFTLinear.from_linear(nn.Linear(256, 256), 128)
    assert layer._use_dense(torch.zeros(4096, 256))
    assert not layer._use_dense(torch.zeros(16, 256))
    with pytest.raises(ValueError, match="forward_mode"):
        OSFTLinear(4, 4, 1, forward_mode="fast")


def test_from_linear_keeps_dtype_and_bias_flag():
    lin = nn.Linear(6, 4).to(torch.bfloat16)
    lin.bias.requires_grad_(False)
    layer = OSFTLinear.from_linear(lin, 2)
    assert layer.U_low.dtype == torch.bfloat16 and layer.weight_dtype == torch.bfloat16
    assert not layer.bias.requires_grad
    assert layer.dense_weight().dtype == torch.bfloat16
    assert (layer.dense_weight(torch.float32) - lin.weight.float()).abs().max() < 2e-2  # bf16 factors


# ---- projections ----

def test_projections_remove_exactly_the_frozen_components():
    model = Toy()
    apply_osft(model, unfreeze_rank_ratio=0.5, target_patterns=["q_proj", "down_proj", "up_proj"])
    model(torch.randn(5, 12)).pow(2).sum().backward()
    before = {n: (m.U_low.grad.clone(), m.V_low.grad.clone()) for n, m in osft_modules(model).items()}
    project_gradients(model)
    for name, m in osft_modules(model).items():
        U_grad0, V_grad0 = before[name]
        assert (m.U_high.T @ m.U_low.grad).norm() < 1e-6 * U_grad0.norm()
        assert (m.V_high.T @ m.V_low.grad).norm() < 1e-6 * V_grad0.norm()
        # the part orthogonal to the frozen subspace is untouched
        torch.testing.assert_close(m.U_low.grad, U_grad0 - m.U_high @ (m.U_high.T @ U_grad0))
        torch.testing.assert_close(m.V_low.grad, V_grad0 - m.V_high @ (m.V_high.T @ V_grad0))
    with torch.no_grad():
        for m in osft_modules(model).values():
            m.U_low.add_(m.U_high @ torch.ones(m.U_high.shape[1], m.U_low.shape[1]))
            m.V_low.add_(m.V_high @ torch.ones(m.V_high.shape[1], m.V_low.shape[1]))
    project_parameters(model)
    for m in osft_modules(model).values():
        assert (m.U_high.T @ m.U_low).abs().max() < 1e-5 and (m.V_high.T @ m.V_low).abs().max() < 1e-5


def test_the_engine_projects_parameters_without_tf32_and_restores_the_setting(monkeypatch):
    """TF32 (on for CUDA training, engine.model) would leave ~3e-5 of the frozen directions per projection."""
    from training_hub.engine import osft as engine_osft
    from training_hub.osft_core import project

    model = Toy()
    apply_osft(model, unfreeze_rank_ratio=0.5, target_patterns=["up_proj"])
    seen = []
    real = project.project_out
    monkeypatch.setattr(project, "project_out",
                        lambda *a: seen.append(torch.backends.cuda.matmul.allow_tf32) or real(*a))
    method = engine_osft.OSFTMethod(unfreeze_rank_ratio=0.5, target_patterns=["up_proj"], freeze_non_targets=True)
    saved = torch.backends.cuda.matmul.allow_tf32  # a property-like setting: monkeypatch cannot restore it
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        method.after_step(model)
        assert seen and not any(seen)
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def test_projection_is_a_no_op_without_frozen_directions_and_skips_missing_grads():
    x = torch.randn(4, 3)
    project_out(torch.empty(4, 0), x_copy := x.clone())
    assert torch.equal(x, x_copy)
    model = Toy()
    apply_osft(model, unfreeze_rank_ratio=0.5, target_patterns=["up_proj"])
    project_gradients(model)  # no backward yet: every .grad is None
    assert all(m.U_low.grad is None for m in osft_modules(model).values())
    with torch.no_grad():
        assert math.isfinite(model(torch.randn(2, 12)).sum().item())


# ---- precision of the dense path ----

def _layer_and_inputs(n_out=48, n_in=40, tokens=256, frozen=20, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n_out, n_in, generator=g) / n_in ** 0.5)
    layer = OSFTLinear.from_linear(linear, frozen, forward_mode="dense")
    return layer, torch.randn(2, tokens // 2, n_in, generator=g), torch.randn(2, tokens // 2, n_out, generator=g)


def _forward_backward(layer, x, grad_out, autocast=False):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
    out.backward(grad_out.to(out.dtype))
    return out, [x.grad, *(p.grad for p in layer.parameters() if p.requires_grad)]


def test_fp32_dense_path_is_the_plain_fp32_formula_bit_for_bit():
    """Without bf16 nothing changed: W composed in fp32, G = grad_out^T x and its products in fp32."""
    from training_hub.osft_core.linear import compose_weight

    layer, x, grad_out = _layer_and_inputs()
    out, (gx, dU, dS, dV, db) = _forward_backward(layer, x, grad_out)
    factors = [t.detach() for t in (layer.U_high, layer.S_high, layer.V_high, layer.U_low, layer.S_low, layer.V_low)]
    weight = compose_weight(*factors)
    assert torch.equal(out, torch.nn.functional.linear(x, weight, layer.bias.detach()))
    assert torch.equal(gx, grad_out @ weight)
    G = grad_out.reshape(-1, 48).T @ x.reshape(-1, 40)
    U, S, V = factors[3:]
    assert torch.equal(dU, (G @ V) * S) and torch.equal(dS, (U * (G @ V)).sum(0))
    assert torch.equal(dV, (G.T @ U) * S) and torch.equal(db, grad_out.reshape(-1, 48).sum(0))


@pytest.mark.parametrize("mode", ["dense", "factored"])
@pytest.mark.parametrize("how", ["autocast", "bf16 input"])
def test_bf16_gradients_are_within_1e_2_of_fp64(how, mode):
    """bf16 GEMMs with fp32 accumulation: measured relative errors ~4e-3 here (3.7e-3 at 2048x2048, 4096 tokens;
    benchmarks/osft_cost.py --layer); the factor gradients stay fp32 for the fp32 master factors, the output is
    bf16 in both modes (as nn.Linear's under autocast)."""
    import copy

    layer, x, grad_out = _layer_and_inputs(tokens=512)
    layer.forward_mode = mode
    reference = _forward_backward(copy.deepcopy(layer).double(), x.double(), grad_out.double())[1]
    bf16_x = x.bfloat16() if how == "bf16 input" else x
    out, grads = _forward_backward(layer, bf16_x, grad_out, autocast=how == "autocast")
    assert out.dtype == torch.bfloat16
    assert [g.dtype for g in grads[1:]] == [torch.float32] * 4
    for name, got, want in zip(["x", "U_low", "S_low", "V_low", "bias"], grads, reference):
        err = float((got.double() - want).norm() / want.norm())
        assert 1e-5 < err < 1e-2, (name, err)  # bf16 really was used, and it is close


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.mm with out_dtype=float32)")
def test_bf16_gradients_on_cuda_are_within_1e_2_of_fp64():
    import copy

    layer, x, grad_out = _layer_and_inputs(tokens=512)
    reference = _forward_backward(copy.deepcopy(layer).double(), x.double(), grad_out.double())[1]
    out, grads = _forward_backward(layer.cuda(), x.cuda(), grad_out.cuda(), autocast=True)
    assert out.dtype == torch.bfloat16 and [g.dtype for g in grads[1:]] == [torch.float32] * 4
    for name, got, want in zip(["x", "U_low", "S_low", "V_low", "bias"], grads, reference):
        err = float((got.cpu().double() - want).norm() / want.norm())
        assert 1e-5 < err < 1e-2, (name, err)


def test_bf16_steps_track_fp32_and_keep_the_factors_orthogonal():
    """Projected AdamW steps under bf16 autocast: the loss follows the fp32 run, and the fp32 projections still
    keep U_low/V_low orthogonal to the frozen factors."""
    g = torch.Generator().manual_seed(1)
    x, target = torch.randn(256, 12, generator=g), torch.randn(256, 12, generator=g)
    losses = {}
    for name, enabled in (("fp32", False), ("bf16", True)):
        model = Toy()
        apply_osft(model, unfreeze_rank_ratio=0.5, target_patterns=["q_proj", "down_proj", "up_proj"],
                   forward_mode="dense")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses[name] = []
        for _ in range(15):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                loss = (model(x).float() - target).pow(2).mean()
            loss.backward()
            project_gradients(model)
            opt.step()
            opt.zero_grad(set_to_none=True)
            project_parameters(model)
            losses[name].append(loss.item())
    assert losses["bf16"] != losses["fp32"] and losses["bf16"][-1] < 0.9 * losses["bf16"][0]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=5e-3)  # measured: 9e-4 at most
    for m in osft_modules(model).values():
        assert (m.U_high.T @ m.U_low).abs().max() < 1e-5 and (m.V_high.T @ m.V_low).abs().max() < 1e-5
