"""The planner: steps, memory and time predicted from the engine's own code, against the runs it predicts.

A plan must equal its run in steps, samples and tokens (the same planning functions), and come within a few per cent
of the run's own memory ledger (the same counting rules, run on fake tensors); it writes nothing into
ckpt_output_dir. Upstream's ``estimate()``/estimator classes answer through the same planner.
"""

from __future__ import annotations

import json
import warnings

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def chat_data():
    from training_hub.tiny import demo_data_path

    return demo_data_path()


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory, chat_data):
    chats = [json.loads(line)["messages"] for line in chat_data.read_text().splitlines()][:48]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": m[:-1], "chosen": [m[-1]], "rejected": [chats[k - 1][-1]]}) + "\n"
                            for k, m in enumerate(chats)))
    return path


def params(model, data, out, **extra):
    return dict(model_path=str(model), data_path=str(data), ckpt_output_dir=str(out), max_seq_len=256,
                effective_batch_size=8, disable_progress_bar=True, **extra)


# ------------------------------------------------------------------------------------------------ the ledger

def test_saved_tensor_meter_counts_saved_storages_once_and_never_parameters():
    from training_hub.engine.ledger import SavedTensorMeter

    model = torch.nn.Linear(16, 8, bias=False)
    x = torch.randn(32, 16, requires_grad=True)
    meter = SavedTensorMeter(model)
    with meter.watch():
        hidden = model(x)  # saves x (the weight is a parameter: not an activation)
        out = hidden.exp()  # saves its result
        out[:, :4].exp().sum().backward()  # a view's exp saves its own result
    assert meter.peak == x.numel() * 4 + hidden.numel() * 4 + 32 * 4 * 4


def test_the_run_records_its_ledger_and_the_plan_predicts_it(tiny_model_dir, chat_data, tmp_path):
    import training_hub

    kw = params(tiny_model_dir, chat_data, tmp_path / "run", max_steps=5, gradient_checkpointing=True)
    plan = training_hub.plan("sft", **kw)
    assert not (tmp_path / "run").exists()  # nothing written into ckpt_output_dir
    result = training_hub.sft(**kw)
    measured = result.metrics["memory"]
    assert (plan.steps, plan.samples, plan.tokens) == (result.metrics["steps"], result.metrics["samples"],
                                                       result.metrics["tokens"])
    for key in ("parameters", "gradients", "optimizer"):
        assert plan.memory[key] == measured[key], key
    assert abs(plan.memory["total"]["expected"] / measured["total"] - 1) < 0.05
    assert measured["total"] == sum(measured[k] for k in ("parameters", "gradients", "optimizer", "activations"))
    assert plan.memory["total"]["low"] <= plan.memory["total"]["expected"] <= plan.memory["total"]["high"]
    assert 0 < plan.time_seconds["low"] < plan.time_seconds["expected"] < plan.time_seconds["high"]
    assert set(plan.setup_seconds) == {"data", "model load"}  # timed while planning: what comes before the loop


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["osft", "lora_sft", "dpo"])
def test_plan_matches_the_run_for_each_algorithm(algorithm, tiny_model_dir, chat_data, pairs_path, tmp_path):
    import training_hub

    extra = {"osft": {"unfreeze_rank_ratio": 0.5}, "lora_sft": {"lora_r": 4}, "dpo": {}}[algorithm]
    kw = params(tiny_model_dir, pairs_path if algorithm == "dpo" else chat_data, tmp_path / "run", max_steps=3,
                **extra)
    plan = training_hub.plan(algorithm, calibrate=False, **kw)
    assert plan.time_seconds["expected"] is None
    result = getattr(training_hub, algorithm)(**kw, **({"backend": "native"} if algorithm == "dpo" else {}))
    measured = result.metrics["memory"]
    assert plan.steps == result.metrics["steps"] == 3
    assert plan.memory["gradients"] == measured["gradients"]  # trainable tensors: the method's own (factors, adapters)
    assert abs(plan.memory["total"]["expected"] / measured["total"] - 1) < 0.05


def test_steps_are_exact_across_epochs_and_ranks(tiny_model_dir, chat_data, tmp_path):
    """Without running: the plan's steps are run_steps over config_epoch, the functions the loop plans with."""
    from training_hub.config.algorithms import SFTConfig
    from training_hub.engine.batching import config_epoch
    from training_hub.engine.plan import read_data, run_steps
    from training_hub.engine.run import total_steps

    config = SFTConfig(**params(tiny_model_dir, chat_data, tmp_path / "out", num_epochs=3, max_steps=100))
    data = read_data(config, "sft", tmp_path / "cache")
    per_epoch, total = total_steps(config, len(data.lengths))
    assert total == 100 and per_epoch == 42
    steps = run_steps(config, data, total)
    assert len(steps) == 100 and steps[42:84] == config_epoch(config, data.lengths, data.max_tokens, 1)
    shares = [run_steps(config, data, total, 2, rank) for rank in (0, 1)]
    assert [s.num_samples for s in shares[0]] == [s.num_samples for s in steps]
    assert sum(len(m) for s in shares[0] + shares[1] for m in s.micro_batches) == sum(s.num_samples for s in steps)


def test_named_gpu_time_and_a_gpu_memory_that_does_not_fit(tiny_model_dir, chat_data, tmp_path):
    import training_hub

    kw = params(tiny_model_dir, chat_data, tmp_path / "run", num_epochs=2)
    plan = training_hub.plan("sft", gpu="H100", utilization=0.5, gpu_memory=3_000_000, **kw)
    assert plan.device == "H100" and plan.checkpointing  # planned with the CUDA defaults
    assert "H100" in plan.time_method and plan.time_seconds["expected"] > 0
    assert plan.fits == {"capacity": 3_000_000, "fits": False}
    table = str(plan)
    assert "does NOT fit" in table and "optimizer" in table and "with checkpointing" in table
    with pytest.raises(ValueError, match="no peak FLOP/s known"):
        training_hub.plan("sft", gpu="Z80", **kw)
    with pytest.raises(ValueError, match="ckpt_output_dir"):
        training_hub.plan("sft", model_path=str(tiny_model_dir), data_path=str(chat_data))
    with pytest.raises(ValueError, match="sft, osft, lora_sft, dpo"):
        training_hub.plan("grpo", **kw)
    assert not (tmp_path / "run").exists()


def test_a_run_that_cannot_fit_stops_before_loading_with_levers(tiny_model_dir, chat_data, tmp_path):
    import training_hub
    from training_hub.config.algorithms import SFTConfig
    from training_hub.engine.method import TrainingMethod
    from training_hub.engine.plan import check_fits, read_data

    kw = params(tiny_model_dir, chat_data, tmp_path / "out", max_tokens_per_gpu=256, gradient_checkpointing=False)
    memory = training_hub.plan("sft", calibrate=False, **kw).memory
    states = memory["parameters"] + memory["gradients"] + memory["optimizer"]
    config = SFTConfig(**kw)
    data = read_data(config, "sft", tmp_path / "cache")
    check_fits(config, TrainingMethod(), lambda: data, torch.device("cpu"))  # CPU: no check
    check_fits(config, TrainingMethod(), lambda: data, torch.device("cpu"), free=memory["total"]["low"])  # fits
    with pytest.raises(MemoryError) as info:  # below the low bound: stops
        check_fits(config, TrainingMethod(), lambda: data, torch.device("cpu"),
                   free=int(states + 0.8 * memory["activations"]))
    message = str(info.value)
    assert "largest micro-batch" in message and "max_tokens_per_gpu=" in message
    assert "gradient_checkpointing=True" in message and "nproc_per_node=" in message
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ upstream's API

def test_estimate_as_upstreams_notebooks_call_it(tiny_model_dir):
    from training_hub import (BasicEstimator, LoRAEstimator, OSFTEstimator, OSFTEstimatorExperimental,
                              QLoRAEstimator, estimate)

    model = str(tiny_model_dir)
    chosen = None
    for candidate in [16384, 8192, 4096, 2048, 1024, 512, 256]:  # templated_sft.ipynb's loop
        _, expected, _ = estimate(training_method="sft", num_gpus=1, gpu_memory=20 * 2**20, model_path=model,
                                  max_tokens_per_gpu=candidate, verbose=0)
        if expected <= 20 * 2**20 * 0.9:
            chosen = candidate
            break
    assert chosen is not None and chosen < 16384  # activations grow with the budget; the loop steps down
    sft = BasicEstimator(num_gpus=2, gpu_memory=48 * 2**30, model_path=model, max_tokens_per_gpu=1024,
                         verbose=0).estimate()
    osft = OSFTEstimator(num_gpus=2, gpu_memory=48 * 2**30, model_path=model, max_tokens_per_gpu=1024, verbose=0,
                         unfreeze_rank_ratio=0.25).estimate()
    lora = LoRAEstimator(num_gpus=2, gpu_memory=48 * 2**30, model_path=model, batch_size=8, max_seq_len=128,
                         verbose=0, lora_r=8).estimate()
    qlora = QLoRAEstimator(num_gpus=2, gpu_memory=48 * 2**30, model_path=model, batch_size=8, max_seq_len=128,
                           verbose=0, lora_r=8).estimate()
    for low, expected, high in (sft, osft, lora, qlora):
        assert all(isinstance(v, int) for v in (low, expected, high)) and 0 < low <= expected <= high
    assert qlora[1] < lora[1] < estimate(training_method="sft", num_gpus=2, model_path=model, batch_size=8,
                                         max_seq_len=128, verbose=0)[1]
    assert estimate(training_method="osft", num_gpus=2, model_path=model, max_tokens_per_gpu=1024,
                    verbose=0) == osft
    with pytest.warns(DeprecationWarning):
        OSFTEstimatorExperimental(model_path=model, max_tokens_per_gpu=256, verbose=0)
    from training_hub.profiling import memory_estimator, timing_estimator  # upstream's module paths

    assert memory_estimator.estimate is estimate and callable(timing_estimator.time_estimate)
    with pytest.raises(ValueError, match="batch_size and max_seq_len"):
        LoRAEstimator(model_path=model, verbose=0)
    with pytest.raises(ValueError, match="max_tokens_per_gpu must be provided"):
        estimate(model_path=model, verbose=0)


def test_estimate_verbose_prints_the_breakdown_and_verdict(tiny_model_dir, capsys):
    from training_hub import estimate

    estimate(training_method="lora", num_gpus=2, gpu_memory=2**20, model_path=str(tiny_model_dir), batch_size=4,
             max_seq_len=128, verbose=2, lora_r=8)
    out = capsys.readouterr().out
    assert "activations" in out and "per GPU" in out and "does not fit" in out


def test_time_estimate_returns_timedeltas(tiny_model_dir, chat_data, tmp_path):
    from datetime import timedelta

    from training_hub import time_estimate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        low, high = time_estimate("sft", str(tiny_model_dir), num_gpus=1, dataset_dir=str(chat_data),
                                  batch_size=8, max_seq_len=256, max_tokens_per_gpu=1024,
                                  ckpt_dir=str(tmp_path / "t"), verbose=0)
    assert isinstance(low, timedelta) and timedelta(0) < low < high
    assert not (tmp_path / "t").exists()


# ------------------------------------------------------------------------------------------------ the command

def test_plan_command_prints_json_and_a_table(tiny_model_dir, chat_data, tmp_path, capsys):
    from training_hub.cli import main

    flags = ["--model-path", str(tiny_model_dir), "--data-path", str(chat_data), "--ckpt-output-dir",
             str(tmp_path / "run"), "--max-seq-len", "256", "--effective-batch-size", "16"]
    assert main(["plan", "sft", *flags, "--json", "--no-calibrate"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["steps"] == 21 and planned["samples"] == 336
    assert set(planned["memory"]) >= {"parameters", "gradients", "optimizer", "activations", "total"}
    assert set(planned["memory"]["total"]) == {"low", "expected", "high"}
    assert set(planned["time_seconds"]) == {"low", "expected", "high"}
    assert main(["plan", "lora-sft", *flags, "--gpu", "H100", "--gpu-memory", "1MiB", "--lora-r", "4"]) == 0
    table = capsys.readouterr().out
    assert "Memory per device" in table and "H100" in table and "does NOT fit" in table
    assert main(["plan", "sft", *flags, "--num-epoch", "2"]) == 2  # a misspelt flag: named, exit 2
    assert "num_epochs" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
