"""optimizer_state_dtype="bfloat16": AdamW with bf16 moments, half the optimizer memory, the same training."""

from __future__ import annotations

import pytest
import torch

from training_hub.engine.optim import AdamWBF16States


def _fit(optimizer_class, steps=30, **kw):
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4)
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    optimizer = optimizer_class(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **kw)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return model, optimizer


def test_the_update_is_adamw_within_bf16_rounding():
    ours, optimizer = _fit(AdamWBF16States)
    reference, _ = _fit(torch.optim.AdamW)
    for a, b in zip(ours.parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=2e-3), (a - b).abs().max()
    state = next(iter(optimizer.state.values()))
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    assert int(state["step"]) == 30


def test_the_moments_stay_bf16_through_a_saved_state():
    model, optimizer = _fit(AdamWBF16States, steps=3)
    again = AdamWBF16States(model.parameters(), lr=1e-2)
    again.load_state_dict(optimizer.state_dict())
    for state in again.state.values():
        assert state["exp_avg"].dtype == torch.bfloat16 and state["step"].device.type == "cpu"
        assert int(state["step"]) == 3


@pytest.mark.slow
def test_a_run_with_bf16_states_trains_and_holds_half_the_optimizer_memory(tiny_model_dir, tmp_path):
    from training_hub import plan, sft
    from training_hub.tiny import demo_data_path

    common = dict(max_seq_len=128, effective_batch_size=8, max_steps=12, learning_rate=1e-3,
                  disable_progress_bar=True)
    full = sft(str(tiny_model_dir), str(demo_data_path()), str(tmp_path / "fp32"), **common)
    lean = sft(str(tiny_model_dir), str(demo_data_path()), str(tmp_path / "bf16"), optimizer_state_dtype="bfloat16",
               **common)
    assert abs(lean.metrics["final_loss"] - full.metrics["final_loss"]) < 0.05 * full.metrics["final_loss"]
    full_bytes, lean_bytes = full.metrics["memory"]["optimizer"], lean.metrics["memory"]["optimizer"]
    assert 0.45 < lean_bytes / full_bytes < 0.55
    predicted = plan("sft", model_path=str(tiny_model_dir), data_path=str(demo_data_path()),
                     ckpt_output_dir=str(tmp_path / "plan"), optimizer_state_dtype="bfloat16", calibrate=False,
                     **common)
    assert predicted.memory["optimizer"] == lean_bytes


def test_other_backends_refuse_it(tiny_model_dir, tmp_path):
    pytest.importorskip("trl")
    from training_hub import sft

    with pytest.raises(ValueError, match="optimizer_state_dtype: bf16 optimizer states are the native engine's"):
        sft(str(tiny_model_dir), "x.jsonl", str(tmp_path / "o"), backend="trl", optimizer_state_dtype="bfloat16")
