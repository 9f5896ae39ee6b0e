"""osft() end to end in the native loop: the frozen subspace survives training into the saved checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_engine_train import load_weights, run_until_killed, write_chat
from training_hub import ParameterError, osft, sft
from training_hub.osft_core import default_target_patterns, find_targets, frozen_rank

RATIO = 0.5
COMMON = dict(max_seq_len=128, effective_batch_size=8, learning_rate=3e-3, lr_scheduler="cosine", warmup_steps=2,
              weight_decay=0.01, seed=7, disable_progress_bar=True)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    return write_chat(tmp_path_factory.mktemp("osft_data") / "chat.jsonl")


@pytest.fixture(scope="module")
def original(tiny_model_dir):
    """Original weights and the names of the default OSFT targets, read with plain transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    targets = find_targets(model, default_target_patterns(model.config))
    return {k: v.clone() for k, v in model.state_dict().items()}, targets


@pytest.fixture(scope="module")
def runs(tiny_model_dir, chat_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("osft_runs")
    kw = dict(model_path=str(tiny_model_dir), data_path=str(chat_data), max_steps=8, **COMMON)
    return {"osft": osft(ckpt_output_dir=str(root / "osft"), unfreeze_rank_ratio=RATIO, **kw),
            "sft": sft(ckpt_output_dir=str(root / "sft"), **kw)}


def invariant_errors(weights: dict, original_weights: dict, targets: list[str], ratio: float) -> dict[str, float]:
    """||W' V_h - U_h diag(S_h)|| / ||S_h|| per target, with the SVD taken afresh from the original weights."""
    errors = {}
    for name in targets:
        w0 = original_weights[f"{name}.weight"].double()
        u, s, vh = torch.linalg.svd(w0, full_matrices=False)
        k = frozen_rank(min(w0.shape), ratio)
        u_h, s_h, v_h = u[:, :k], s[:k], vh[:k].T
        w1 = weights[f"{name}.weight"].double()
        errors[name] = float(torch.linalg.norm(w1 @ v_h - u_h * s_h) / torch.linalg.norm(s_h))
    return errors


def test_frozen_subspace_is_kept_in_the_checkpoint_and_plain_sft_breaks_it(runs, original):
    original_weights, targets = original
    assert len(targets) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    osft_err = invariant_errors(load_weights(runs["osft"].checkpoint_path), original_weights, targets, RATIO)
    sft_err = invariant_errors(load_weights(runs["sft"].checkpoint_path), original_weights, targets, RATIO)
    assert max(osft_err.values()) < 1e-4, osft_err
    assert min(sft_err.values()) > 1e-3, sft_err  # negative control: the same run without OSFT moves them


def test_bf16_run_tracks_fp32_and_keeps_the_frozen_subspace(runs, original, tiny_model_dir, chat_data, tmp_path,
                                                            monkeypatch):
    """dtype='bfloat16' (autocast, fp32 master factors): the dense OSFT layers take their bf16 backward, the loss
    curve follows the fp32 run's (the runs fixture: same data, seed and steps) and the checkpoint still keeps the
    frozen subspace."""
    from training_hub.osft_core import linear

    calls, real = [], linear._backward_bf16
    monkeypatch.setattr(linear, "_backward_bf16", lambda ctx, grad: calls.append(1) or real(ctx, grad))
    result = osft(model_path=str(tiny_model_dir), data_path=str(chat_data), ckpt_output_dir=str(tmp_path / "bf16"),
                  unfreeze_rank_ratio=RATIO, max_steps=8, dtype="bfloat16", **COMMON)
    assert calls

    def losses(run):
        return [json.loads(line)["loss"] for line in (Path(run.output_dir) / "metrics.jsonl").read_text().splitlines()]

    fp32, bf16 = losses(runs["osft"]), losses(result)
    assert len(bf16) == len(fp32) >= 3 and bf16 != fp32
    assert bf16 == pytest.approx(fp32, abs=1e-2)  # measured: 1.5e-3 at most
    original_weights, targets = original
    errors = invariant_errors(load_weights(result.checkpoint_path), original_weights, targets, RATIO)
    assert max(errors.values()) < 1e-4, errors


def test_targets_and_other_weights_trained(runs, original):
    original_weights, targets = original
    trained = load_weights(runs["osft"].checkpoint_path)
    for name in targets:
        before, after = original_weights[f"{name}.weight"], trained[f"{name}.weight"]
        assert float((after - before).norm() / before.norm()) > 1e-3, name
    assert not torch.equal(trained["model.embed_tokens.weight"], original_weights["model.embed_tokens.weight"])
    assert runs["osft"].metrics["final_loss"] < json.loads(
        (Path(runs["osft"].output_dir) / "metrics.jsonl").read_text().splitlines()[0])["loss"]


def test_checkpoint_is_an_ordinary_hf_checkpoint(runs, original, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(runs["osft"].checkpoint_path, dtype=torch.float32)
    assert set(model.state_dict()) == set(original[0])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied


def test_the_osft_function_is_not_shadowed_by_the_method_package():
    import training_hub
    import training_hub.osft_core  # noqa: F401  (a package named like the function would replace it)

    assert callable(training_hub.osft) and training_hub.osft.__name__ == "osft"


def test_ratio_is_validated_before_any_work(tiny_model_dir, chat_data, tmp_path):
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ParameterError, match="unfreeze_rank_ratio: must be"):
            osft(str(tiny_model_dir), str(chat_data), str(tmp_path / "x"), unfreeze_rank_ratio=bad)
    with pytest.raises(ParameterError, match="unfreeze_rank_ratio: required"):
        osft(model_path=str(tiny_model_dir), data_path=str(chat_data), ckpt_output_dir=str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_osft_run(tiny_model_dir, chat_data, tmp_path):
    kwargs = dict(model_path=str(tiny_model_dir), data_path=str(chat_data), unfreeze_rank_ratio=RATIO, num_epochs=2,
                  save_samples=16, **COMMON)
    killed = tmp_path / "killed"
    run_until_killed("osft", kwargs, killed, tmp_path / "marker")
    assert [p.name for p in (killed / "state").iterdir()] == ["step_000000002"]
    resumed = osft(**kwargs, ckpt_output_dir=str(killed), resume=True)
    reference = osft(**kwargs, ckpt_output_dir=str(tmp_path / "reference"))
    assert resumed.metrics["steps"] == reference.metrics["steps"] == 12
    got, want = load_weights(resumed.checkpoint_path), load_weights(reference.checkpoint_path)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0, msg=name)
