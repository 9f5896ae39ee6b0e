"""Upstream 0.11.2 compatibility: OSFT checkpoint names (samples_<N>.0), nproc_per_node as a string, lora_sft's
eval_data_path / per_device_eval_batch_size / result["model"] / result["tokenizer"] and defaults, fsdp_options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from training_hub import UpstreamParameterWarning, lora_sft, osft
from training_hub.config.algorithms import LoRASFTConfig, OSFTConfig, SFTConfig
from training_hub.config.declare import ParameterError, validate_params
from training_hub.config.processes import launch_plan
from training_hub.config.upstream import fold_translated, upstream_call

torch = pytest.importorskip("torch")

BASE = dict(model_path="m", data_path="d.jsonl", ckpt_output_dir="o")
TINY = dict(max_seq_len=128, max_tokens_per_gpu=1024, effective_batch_size=8, learning_rate=1e-3, num_epochs=1,
            disable_progress_bar=True, dtype="float32", seed=3)


def config(cls, **params):
    params = upstream_call({**BASE, **params}, cls)
    cfg = validate_params(cls, params)
    return fold_translated(cfg, set(params), what="test")[0]


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> Path:
    from training_hub.tiny import demo_data_path

    path = tmp_path_factory.mktemp("v011") / "chat.jsonl"
    path.write_text("\n".join(demo_data_path().read_text().splitlines()[:16]) + "\n")
    return path


# ------------------------------------------------------------------------------------------ 1. checkpoint names

def test_checkpoint_listing_accepts_both_names_and_orders_by_samples(tmp_path):
    from training_hub.backends.engine_adapter import newest_checkpoint
    from training_hub.engine.checkpoint import (
        checkpoint_name, checkpoint_samples, hf_checkpoints, prune_hf_checkpoints,
    )

    assert (checkpoint_name(16), checkpoint_name(16, float_name=True)) == ("samples_16", "samples_16.0")
    assert [checkpoint_samples(n) for n in ("samples_8", "samples_8.0", "samples_8.5", "samples_x", "other")] == [
        8, 8, None, None, None]
    for name in ("samples_24.0", "samples_8", "samples_100.0", "samples_16.0", ".tmp-samples_200"):
        (tmp_path / "hf_format" / name).mkdir(parents=True)
    assert [p.name for p in hf_checkpoints(tmp_path)] == ["samples_8", "samples_16.0", "samples_24.0",
                                                          "samples_100.0"]
    assert newest_checkpoint(tmp_path) == str(tmp_path / "hf_format" / "samples_100.0")
    prune_hf_checkpoints(tmp_path, 2)
    assert [p.name for p in hf_checkpoints(tmp_path)] == ["samples_24.0", "samples_100.0"]


def test_osft_names_its_checkpoints_as_upstream_and_resume_finds_them(tiny_model_dir, chat, tmp_path):
    out = tmp_path / "run"
    kw = dict(unfreeze_rank_ratio=0.5, backend="native", save_samples=8, **TINY)
    result = osft(str(tiny_model_dir), str(chat), str(out), **kw)
    names = sorted(p.name for p in (out / "hf_format").iterdir())
    assert names == ["samples_16.0", "samples_8.0"]
    assert result.checkpoint_path == str(out / "hf_format" / "samples_16.0")
    assert sorted(Path(p).name for p in __import__("glob").glob(str(out / "hf_format" / "samples_*.0"))) == names
    with pytest.raises(ValueError, match=r"2 checkpoint\(s\) in hf_format"):  # an existing run is seen
        osft(str(tiny_model_dir), str(chat), str(out), **kw)
    again = osft(str(tiny_model_dir), str(chat), str(out), resume=True, keep_last_n_checkpoints=1, **kw)
    assert again.checkpoint_path == result.checkpoint_path


# ------------------------------------------------------------------------------------------ 2. nproc_per_node

@pytest.mark.parametrize("given, processes", [("1", 1), ("2", 2), (3, 3), ("auto", None), ("gpu", None)])
def test_nproc_per_node_takes_upstream_strings(given, processes):
    cfg = config(SFTConfig, nproc_per_node=given)
    expected = processes if processes is not None else max(torch.cuda.device_count(), 1)
    assert launch_plan(cfg, {}).nproc_per_node == expected


@pytest.mark.parametrize("given, message", [("two", "expected a whole number, 'auto' or 'gpu'"),
                                            ("gpus", "did you mean 'gpu'"), ("0", "must be >= 1"),
                                            (0, "must be >= 1")])
def test_nproc_per_node_bad_values_are_named(given, message):
    with pytest.raises(ParameterError, match=message):
        config(SFTConfig, nproc_per_node=given)


def test_a_string_process_count_still_refuses_one_process_backends(tmp_path):
    with pytest.raises(ValueError, match="nproc_per_node"):
        lora_sft("m", "d.jsonl", str(tmp_path / "o"), backend="native", nproc_per_node="2")


# ------------------------------------------------------------------------------------------ 2. lora_sft names

def test_eval_data_path_is_validation_data_path_and_allows_eval_steps():
    cfg = config(LoRASFTConfig, eval_data_path="v.jsonl", eval_steps=5)
    assert cfg.validation_data_path == "v.jsonl" and cfg.eval_steps == 5
    assert config(LoRASFTConfig, eval_data_path="v.jsonl", validation_data_path="w.jsonl").validation_data_path == \
        "w.jsonl"  # ours wins when both are given
    with pytest.raises(ParameterError, match="validation_split: give either"):
        config(LoRASFTConfig, eval_data_path="v.jsonl", validation_split=0.1)


def test_per_device_eval_batch_size_is_accepted_and_ignored_with_one_warning():
    from training_hub.backends.native import NativeLoRASFTBackend
    from training_hub.config.upstream import warn_ignored

    cfg = config(LoRASFTConfig, per_device_eval_batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_ignored(cfg, {"per_device_eval_batch_size"}, NativeLoRASFTBackend)
    assert [str(w.message) for w in caught if issubclass(w.category, UpstreamParameterWarning)] == [
        "per_device_eval_batch_size=4 is ignored: validation batches are cut by max_tokens_per_gpu like the training "
        "micro-batches (an evaluation batch size changes memory and speed, not what is evaluated)."]


def test_result_loads_lazy_keys_once_and_only_when_asked():
    from training_hub.result import TrainingResult

    calls = []
    result = TrainingResult(status="success", checkpoint_path="x")
    result.set_lazy("model", lambda: calls.append(1) or "MODEL")
    assert "model" in result and list(result) == ["status", "checkpoint_path", "metrics", "output_dir"]
    assert json.dumps(dict(result)) and calls == []  # iterating loads nothing
    assert result["model"] == result["model"] == result.get("model") == "MODEL" and calls == [1]
    with pytest.raises(KeyError, match="model"):
        result["nope"]


# ------------------------------------------------------------------------------------------ 2 and 5. lora_sft

@pytest.mark.parametrize("backend", ["native", "trl"])
def test_lora_defaults_and_result_model_as_upstream(backend, tiny_model_dir, chat, tmp_path):
    if backend == "trl":
        pytest.importorskip("trl")
    pytest.importorskip("peft")
    from peft import PeftModel

    result = lora_sft(str(tiny_model_dir), str(chat), str(tmp_path / "run"), backend=backend, eval_data_path=str(chat),
                      **TINY)
    adapter = json.loads((Path(result.checkpoint_path) / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and adapter["lora_alpha"] == 32  # upstream's defaults
    targets = {name.split(".")[-1] for name in adapter["target_modules"]}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # all linear
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["type"] == "validation" for r in records)  # eval_data_path took effect
    assert "model" in result and "model" not in list(result)
    model, tokenizer = result["model"], result["tokenizer"]
    assert isinstance(model, PeftModel) and result["model"] is model
    ids = tokenizer("hello", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size


def test_lora_merge_result_model_is_the_merged_checkpoint(tiny_model_dir, chat, tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel

    result = lora_sft(str(tiny_model_dir), str(chat), str(tmp_path / "run"), backend="native", merge=True, **TINY)
    model = result["model"]
    assert not isinstance(model, PeftModel) and model.name_or_path == result["merged_path"]


# ------------------------------------------------------------------------------------------ 3. fsdp_options

def test_fsdp_options_forms_are_accepted_and_bad_ones_named():
    from training_hub.config.groups import fsdp_cpu_offload

    upstream_like = SimpleNamespace(cpu_offload_params=True, sharding_strategy=None)  # as FSDPOptions(...) reads
    cfg = config(SFTConfig, fsdp_options=upstream_like, strategy="fsdp2")
    assert cfg.fsdp_options == {"cpu_offload_params": True, "sharding_strategy": None}  # JSON-able for workers
    assert fsdp_cpu_offload(cfg.fsdp_options) and fsdp_cpu_offload({"cpu_offload_params": True})
    assert not fsdp_cpu_offload(None) and not fsdp_cpu_offload({})
    with pytest.raises(ParameterError, match="fsdp_options: unknown option"):
        config(SFTConfig, fsdp_options={"offload": True})
    with pytest.raises(ParameterError, match="fsdp_options: expected a dict"):
        config(SFTConfig, fsdp_options=3)


def test_instructlab_gets_fsdp_options_as_its_own_class():
    ilab = pytest.importorskip("instructlab.training")
    from training_hub.backends.engine_adapter import EngineData
    from training_hub.backends.instructlab_training import instructlab_training_args

    data = EngineData("/d/data.jsonl")
    args, _ = instructlab_training_args(config(SFTConfig, fsdp_options={"cpu_offload_params": True}), data,
                                        {"fsdp_options"})
    assert args.fsdp_options.cpu_offload_params
    given = ilab.FSDPOptions(cpu_offload_params=True)
    args, _ = instructlab_training_args(config(SFTConfig, fsdp_options=given, strategy="fsdp2"), data,
                                        {"fsdp_options", "strategy"})
    assert args.fsdp_options.cpu_offload_params
    assert args.fsdp_options.sharding_strategy == ilab.ShardingStrategies.HYBRID_SHARD  # the object's own


def test_cpu_offload_with_one_process_warns_that_it_has_no_effect(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from training_hub.engine.distributed import SINGLE, wrap_model

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with pytest.warns(UserWarning, match="cpu_offload_params=True has no effect: the run has one process"):
        assert wrap_model(model, SINGLE, torch.device("cpu"), cpu_offload=True) is model


OFFLOAD_WORKER = """
import os, sys, torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from torch.distributed.fsdp import CPUOffloadPolicy
from training_hub.engine.distributed import setup, wrap_model
ranks = setup("fsdp2")
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
wrap_model(model, ranks, torch.device("cpu"), cpu_offload=True)
policy = model._get_fsdp_state()._fsdp_param_group.offload_policy
assert isinstance(policy, CPUOffloadPolicy), policy
loss = model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss
loss.backward()
grads = [p.grad for p in model.parameters() if p.grad is not None]
assert grads and all(g.device.type == "cpu" for g in grads)
if ranks.is_main:
    print("OFFLOAD OK", type(policy).__name__, flush=True)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp2_cpu_offload_over_gloo_with_two_processes(tiny_model_dir, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(OFFLOAD_WORKER)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--standalone", str(script), str(tiny_model_dir)], capture_output=True, text=True,
                          timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OFFLOAD OK CPUOffloadPolicy" in done.stdout
