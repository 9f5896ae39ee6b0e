"""GRPO: rows and rewards, the loss math, upstream names, learning on a tiny model, resume, and parity with TRL.

Parity feeds both backends the same fixed completions (the generation step is replaced by a lookup) so that the
losses depend only on the loss code: rewards, group advantages, tempered log-probs, the clipped ratio, the
normaliser. Dr. GRPO is compared over two iterations (the second loss depends on the first update's gradient and
the optimizer step), GRPO with two updates per batch (the second update's ratio is no longer 1).
"""

from __future__ import annotations

import json
import math
import warnings

import pytest

from training_hub import ParameterError, UpstreamParameterWarning, binary_reward, grpo, lora_grpo, tool_call_reward

torch = pytest.importorskip("torch")


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def e_fraction(data_source, solution_str, ground_truth, **extra):
    """A reward the tiny random model can learn fast: the share of 'e' characters in its completion."""
    return solution_str.count("e") / max(len(solution_str), 1)


QUESTIONS = [{"question": f"What is {a} plus {b}?", "ground_truth": str(a + b), "level": a} for a in range(3)
             for b in range(3)]
FAST = dict(group_size=8, prompt_batch_size=2, max_tokens=6, temperature=1.0, learning_rate=3e-2,
            disable_progress_bar=True)


# ------------------------------------------------------------------------------------------------ rewards and rows


def test_builtin_rewards_follow_upstream():
    call = {"tool_calls": [{"function": {"name": "functions.get_weather", "arguments": '{"city": "Oslo", "n": "3"}'}}]}
    assert tool_call_reward(call, "get_weather", {"city": "Oslo", "n": 3}) == 1.0
    assert tool_call_reward(call, "get_weather", {"city": "Rome"}) == 0.5
    assert tool_call_reward(call, "get_time", {"city": "Oslo"}) == 0.0
    assert tool_call_reward({"content": "no call"}, "get_weather", {}) == 0.0
    text = '<think>hm</think><tool_call>{"name": "get-weather", "arguments": {"city": " Oslo "}}</tool_call>'
    assert tool_call_reward(text, "get_weather", {"city": "Oslo"}) == 1.0
    assert binary_reward(0.9999999) == 1.0 and binary_reward(0.5) == 0.0 and binary_reward(0.5, threshold=0.5) == 1.0
    from training_hub.algorithms.rewards import tool_call_score

    assert tool_call_score("x", 'I call {"name": "f", "arguments": {}}', {"tool_name": "f", "tool_args": {}}) == 1.0


def test_rows_and_reward_adapter(tmp_path):
    from training_hub.data.grpo import RewardAdapter, load_tasks

    path = write_rows(tmp_path / "rows.jsonl", [
        {"question": "Q1", "answer": 5, "level": 2},
        {"messages": [{"role": "user", "content": "Q2"}], "ground_truth": "x", "data_source": "mine"},
        {"question": "Q3"}])
    train, held = load_tasks(str(path), None, n_train=2, n_val=5, system_prompt="Be brief.")
    assert [t.messages[0] for t in train] == [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "Q2"}]
    assert train[0].ground_truth == "5" and held[0].ground_truth == "" and held[0].where.endswith("rows.jsonl:3")
    seen = []

    def strict(data_source, solution_str, ground_truth):  # upstream's plain signature: no extra fields passed
        seen.append((data_source, solution_str, ground_truth))
        return 1

    def wide(data_source, solution_str, ground_truth, level=None, extra_info=None):
        seen.append((level, extra_info["index"]))
        return 0.5

    assert RewardAdapter(strict, "generic")(train[1], "out") == 1.0
    assert RewardAdapter(wide, "generic")(train[0], "out") == 0.5
    assert seen == [("mine", "out", "x"), (2, 0)]
    assert RewardAdapter(lambda **kw: True, "generic")(train[0], "out") == 1.0
    for bad in (None, "1.0", float("nan")):
        with pytest.raises(ValueError, match=r"reward_fn <lambda> returned .* for the row at .*rows.jsonl:1"):
            RewardAdapter(lambda **kw: bad, "generic")(train[0], "out")

    def failing(**kw):
        return {}["missing"]

    from training_hub.data.grpo import RewardFunctionError

    with pytest.raises(RewardFunctionError, match=r"reward_fn failing raised KeyError: 'missing' for the row at "
                                                  r".*rows.jsonl:1 .*solution_str='out'") as info:
        RewardAdapter(failing, "generic")(train[0], "out")
    assert isinstance(info.value.__cause__, KeyError)


def test_bad_rows_name_file_line_and_field(tmp_path):
    from training_hub.data.errors import DataValidationError
    from training_hub.data.grpo import load_tasks

    path = write_rows(tmp_path / "bad.jsonl", [
        {"question": "fine", "ground_truth": "1"}, {"ground_truth": "2"}, "[1, 2]",
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"question": ""}])
    with pytest.raises(DataValidationError) as err:
        load_tasks(str(path), None, n_train=10, n_val=0)
    text = str(err.value)
    for where in ("bad.jsonl:2: question: missing", "bad.jsonl:3: row: expected a JSON object",
                  "bad.jsonl:4: messages: the prompt ends with an assistant message", "bad.jsonl:5: question"):
        assert where in text


# ------------------------------------------------------------------------------------------------ loss math


def test_advantages_and_loss_normalisers():
    from training_hub.losses.grpo import group_advantages, policy_loss, token_weights

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0])
    scaled = group_advantages(rewards, 2, scale=True)
    plain = group_advantages(rewards, 2, scale=False)
    assert torch.allclose(plain, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0]))
    assert torch.allclose(scaled, plain / (torch.tensor([1, 1, 1, 1, 0, 0]) * 2 ** -0.5 + 1e-4))
    assert token_weights([2, 4], 2, 10, dr_grpo=True) == [1 / 20] * 6
    assert token_weights([2, 4], 2, 10, dr_grpo=False) == [1 / 4] * 2 + [1 / 8] * 4
    logps = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    old = torch.tensor([-1.5, -2.0, -0.4])
    adv = torch.tensor([1.0, 1.0, -1.0])
    loss, sums = policy_loss(logps, old, adv, torch.ones(3), epsilon=0.2)
    ratio = torch.exp(logps.detach() - old)  # 1.65 (clipped at 1.2 for A > 0), 1, 0.905 (inside)
    assert math.isclose(loss.item(), -(1.2 + 1.0 - ratio[2].item()), rel_tol=1e-6)
    assert sums["clipped"] == 1
    loss.backward()
    assert logps.grad[0] == 0  # a clipped token carries no gradient


# ------------------------------------------------------------------------------------------------ API


def test_upstream_names_warn_once_and_rollout_fn_is_refused(tiny_model_dir, tmp_path):
    path = write_rows(tmp_path / "q.jsonl", QUESTIONS)
    with pytest.raises(ParameterError, match="rollout_fn: upstream's custom rollouts run on ART"):
        lora_grpo(str(tiny_model_dir), str(tmp_path / "a"), rollout_fn=lambda m, t: None, tasks=[{}])
    with pytest.raises(ParameterError, match="n_gpus=2"):
        grpo(str(tiny_model_dir), str(tmp_path / "b"), data_path=str(path), n_gpus=2)
    with pytest.raises(ParameterError, match="data_path: required"):
        grpo(str(tiny_model_dir), str(tmp_path / "c"))
    with pytest.raises(ParameterError, match="group_size: must be >= 2"):
        grpo(str(tiny_model_dir), str(tmp_path / "d"), data_path=str(path), group_size=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grpo(str(tiny_model_dir), str(tmp_path / "e"), data_path=str(path), reward_fn=e_fraction,
             gpu_memory_utilization=0.45, tensor_parallel_size=1, concurrency=32, num_iterations=1, group_size=2,
             prompt_batch_size=1, max_tokens=2, disable_progress_bar=True)
    names = sorted(str(w.message).split("=")[0] for w in caught if issubclass(w.category, UpstreamParameterWarning))
    assert names == ["concurrency", "gpu_memory_utilization", "tensor_parallel_size"]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_reward_rises_and_checkpoint_loads(tiny_model_dir, tmp_path):
    """An upstream-style call with a custom reward: the mean reward rises clearly; plain transformers loads the
    checkpoint; callbacks see every iteration; a resumed run continues the reward history."""
    from transformers import AutoModelForCausalLM

    path = write_rows(tmp_path / "q.jsonl", QUESTIONS)
    seen = []
    result = grpo(model_path=str(tiny_model_dir), ckpt_output_dir=str(tmp_path / "run"), data_path=str(path),
                  reward_fn=e_fraction, num_iterations=12, n_train=7, n_val=2, save_samples=16 * 6,
                  iteration_callback=lambda i, r: seen.append((i, r["mean_reward"])), **FAST)
    history = result["reward_history"]
    assert len(history) == 12 and [i for i, _ in seen] == list(range(1, 13))
    assert sum(history[-3:]) / 3 > 1.5 * sum(history[:3]) / 3, history
    model = AutoModelForCausalLM.from_pretrained(result["checkpoint_path"])
    assert model.config.vocab_size > 0 and result.metrics["validation_reward"] is not None
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert {"reward", "reward_std", "completion_length", "clip_fraction", "tokens_per_second"} <= set(train[0])
    assert [r["reward"] for r in train] == pytest.approx(history)
    resumed = grpo(model_path=str(tiny_model_dir), ckpt_output_dir=str(tmp_path / "run"), data_path=str(path),
                   reward_fn=e_fraction, num_iterations=12, n_train=7, n_val=2, save_samples=16 * 6, resume=True,
                   iteration_callback=lambda i, r: None, **FAST)
    assert resumed["reward_history"] == pytest.approx(history)  # the final state: nothing left to train


@pytest.mark.slow
def test_lora_grpo_writes_an_adapter(tiny_model_dir, tmp_path):
    path = write_rows(tmp_path / "q.jsonl", QUESTIONS)
    result = lora_grpo(str(tiny_model_dir), str(tmp_path / "lora"), data_path=str(path), reward_fn=e_fraction,
                       num_iterations=2, lora_r=4, merge=True, **FAST)
    assert (tmp_path / "lora" / "merged" / "config.json").exists()
    assert json.loads((tmp_path / "lora" / "hf_format").glob("*/adapter_config.json").__next__().read_text())["r"] == 4
    assert len(result["reward_history"]) == 2


# ------------------------------------------------------------------------------------------------ parity with TRL


def fixed_completions(tokenizer, prompts: list[list[int]], group_size: int, iterations: int) -> dict:
    """For each prompt, iterations x group_size token lists of different lengths (some end with EOS)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for p in prompts:
        rows = []
        for k in range(iterations * group_size):
            n = 2 + (k * 3) % 5
            ids = torch.randint(300, len(tokenizer) - 10, (n,), generator=g).tolist()
            rows.append(ids + ([tokenizer.eos_token_id] if k % 2 else []))
        out[tuple(p)] = rows
    return out


def lookup(table: dict):
    """A generation replacement: the next fixed completion of each prompt, in order."""
    used = {key: 0 for key in table}

    def next_for(prompt):
        key = tuple(prompt)
        used[key] += 1
        return list(table[key][used[key] - 1])

    return next_for


@pytest.mark.slow
@pytest.mark.parametrize("dr_grpo", [True, False])
def test_loss_matches_trl_on_fixed_rollouts(tiny_model_dir, tmp_path, monkeypatch, dr_grpo):
    from transformers import AutoTokenizer
    from trl import GRPOTrainer

    from training_hub.engine import grpo as engine

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"question": "What is 2 plus 3?", "ground_truth": "5"}, {"question": "What is 4 plus 1?",
                                                                     "ground_truth": "e"}]
    prompts = [engine.prompt_ids(tokenizer, engine.Task([{"role": "user", "content": r["question"]}], ""))
               for r in rows]
    assert len(prompts[0]) == len(prompts[1]) and prompts[0] != prompts[1]  # no padding on TRL's side
    iterations, updates = (2, 1) if dr_grpo else (1, 2)
    table = fixed_completions(tokenizer, prompts, 4, iterations)

    def reward(data_source, solution_str, ground_truth):
        return float(len(solution_str) % 3) + (ground_truth in solution_str)

    common = dict(tasks=rows, reward_fn=reward, num_iterations=iterations, updates_per_batch=updates,
                  group_size=4, prompt_batch_size=2, max_tokens=8, temperature=0.7, learning_rate=5e-3,
                  use_dr_grpo=dr_grpo, beta=0.05, epsilon=0.2, max_grad_norm=1.0, dtype="float32",
                  disable_progress_bar=True)
    native_next = lookup(table)
    monkeypatch.setattr(engine.GRPORecipe, "generate", lambda self, ps: [native_next(p) for p in ps])
    grpo(str(tiny_model_dir), str(tmp_path / "native"), backend="native", **common)
    native_losses = [r["loss"] for r in map(json.loads, (tmp_path / "native" / "metrics.jsonl").read_text()
                                            .splitlines()) if r["type"] == "train"]

    trl_next, trl_losses = lookup(table), []
    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn",
                        lambda self, prompt_ids, *a, **k: ([trl_next(p) for p in prompt_ids], None))
    original = GRPOTrainer._compute_loss

    def recording(self, model, inputs):
        loss = original(self, model, inputs)
        trl_losses.append(loss.item())
        return loss

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", recording)
    grpo(str(tiny_model_dir), str(tmp_path / "trl"), backend="trl", **common)
    if not dr_grpo:  # native logs the mean over the batch's updates
        trl_losses = [sum(trl_losses) / len(trl_losses)]
    assert len(native_losses) == len(trl_losses) == (2 if dr_grpo else 1)
    assert all(abs(a) > 1e-3 for a in native_losses), native_losses  # the comparison is not of zeros
    assert native_losses == pytest.approx(trl_losses, abs=1e-4)


@pytest.mark.slow
def test_a_resumed_run_continues_exactly(tiny_model_dir, tmp_path):
    """Stopped after 3 of 6 iterations (a hook's stop) and resumed: the same prompts, samples and updates as one
    uninterrupted run, so the same reward history."""
    from training_hub import TrainingHubCallback

    class StopAfter3(TrainingHubCallback):
        def on_step_end(self, ctx, metrics=None):
            if ctx.step == 3:
                ctx.control.should_training_stop = True

    path = write_rows(tmp_path / "q.jsonl", QUESTIONS)
    common = dict(data_path=str(path), reward_fn=e_fraction, num_iterations=6, **FAST)
    whole = grpo(str(tiny_model_dir), str(tmp_path / "whole"), **common)["reward_history"]
    first = grpo(str(tiny_model_dir), str(tmp_path / "split"), callbacks=[StopAfter3()], **common)
    assert len(first["reward_history"]) == 3
    resumed = grpo(str(tiny_model_dir), str(tmp_path / "split"), resume=True, **common)
    assert resumed["reward_history"] == pytest.approx(whole, abs=1e-6)
