"""The instructlab-training (sft) and mini-trainer (osft) adapter backends.

Both engines train on CUDA only, so here (CPU) the tests check everything around the training itself against the
real upstream packages (installed by the dev extra): availability and defaults, the translation into their
``TrainingArgs`` / ``TorchrunArgs``, refusals, the tokenized data read by their own dataset loaders, and the event
callback serialized and re-executed the way their torchrun workers do it. The end-to-end tests replace only the
upstream training loop by a stand-in subprocess that fires the real upstream CallbackManager.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from training_hub import AlgorithmRegistry, TrainingHubCallback, osft, sft
from training_hub.algorithms.osft import OSFTConfig
from training_hub.algorithms.sft import SFTConfig
from training_hub.backends.instructlab_training import InstructLabTrainingSFTBackend, instructlab_training_args
from training_hub.backends.mini_trainer_osft import MiniTrainerOSFTBackend, mini_trainer_args
from training_hub.backends.engine_adapter import EngineData, prepare_engine_data, run_adapter
from training_hub import UpstreamParameterWarning
from training_hub.config.declare import ParameterError, validate_params
from training_hub.tiny import demo_data_path

BASE = dict(model_path="m", data_path="d.jsonl", ckpt_output_dir="/tmp/out")
DATA = EngineData("/cache/upstream/data.jsonl")


def sft_config(**kw):
    return validate_params(SFTConfig, {**BASE, **kw}, what="test")


def osft_config(**kw):
    return validate_params(OSFTConfig, {**BASE, "unfreeze_rank_ratio": 0.25, **kw}, what="test")


@pytest.fixture
def no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    AlgorithmRegistry.refresh_availability()  # availability is asked once per process; CUDA just changed
    yield
    AlgorithmRegistry.refresh_availability()


@pytest.fixture
def fake_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    AlgorithmRegistry.refresh_availability()  # availability is asked once per process; CUDA just changed
    yield
    AlgorithmRegistry.refresh_availability()


# ------------------------------------------------------------------------------------------------ availability


@pytest.mark.parametrize("algo,name", [("sft", "instructlab-training"), ("osft", "mini-trainer")])
def test_registered_unavailable_without_cuda_and_never_the_default(no_cuda, algo, name):
    assert name in AlgorithmRegistry.list_backends(algo)
    status = AlgorithmRegistry.backend_status(algo)[name]
    assert not status and "CUDA" in status.reason and "native" in status.reason
    assert AlgorithmRegistry.default_backend(algo) == "native"


@pytest.mark.parametrize("algo,name,module", [("sft", "instructlab-training", "instructlab.training"),
                                              ("osft", "mini-trainer", "mini_trainer")])
def test_default_where_it_can_run(fake_cuda, algo, name, module):
    pytest.importorskip(module)
    assert AlgorithmRegistry.default_backend(algo) == name


def test_missing_package_is_the_reason(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("mini_trainer") else real(name, *a))
    status = AlgorithmRegistry.backend_status("osft")["mini-trainer"]
    assert not status and "training-hub[mini-trainer]" in status.reason


def test_explicit_adapter_without_cuda_is_a_clear_error(no_cuda, tmp_path, tiny_model_dir):
    with pytest.raises(RuntimeError, match="CUDA.*Backends that can: native"):
        sft(str(tiny_model_dir), str(demo_data_path()), str(tmp_path / "out"), backend="instructlab-training")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ translation


def test_instructlab_translation_against_the_real_classes():
    ilab = pytest.importorskip("instructlab.training")
    config = sft_config(num_epochs=3, effective_batch_size=64, learning_rate=3e-5, max_seq_len=512,
                        max_tokens_per_gpu=4096, warmup_steps=7, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1,
                        seed=5, save_samples=640, use_liger=True, trust_remote_code=True, validation_split=0.1,
                        eval_steps=20, keep_last_n_checkpoints=1, nproc_per_node=4, nnodes=2, node_rank=1,
                        rdzv_id=77, rdzv_endpoint="head:29400", strategy="fsdp2")
    args, torch_args = instructlab_training_args(config, DATA, {"strategy"})
    assert isinstance(args, ilab.TrainingArgs) and isinstance(torch_args, ilab.TorchrunArgs)
    assert (args.model_path, args.ckpt_output_dir) == ("m", "/tmp/out")
    assert args.data_output_dir == "/cache/upstream" and args.process_data is False  # reads <dir>/data.jsonl
    assert (args.num_epochs, args.effective_batch_size, args.learning_rate) == (3, 64, 3e-5)
    assert (args.max_seq_len, args.max_batch_len, args.warmup_steps, args.random_seed) == (512, 4096, 7, 5)
    assert (args.adamw_betas, args.adamw_eps, args.adamw_weight_decay) == ((0.8, 0.99), 1e-6, 0.1)
    assert (args.save_samples, args.use_liger, args.trust_remote_code) == (640, True, True)
    assert (args.validation_split, args.validation_frequency, args.keep_last_checkpoint_only) == (0.1, 20, True)
    assert args.checkpoint_at_epoch is True  # save_final_checkpoint=True goes through the per-epoch save
    assert args.fsdp_options.sharding_strategy == ilab.ShardingStrategies.FULL_SHARD
    assert args.pretraining_config is None
    assert [type(c).__name__ for c in args.callbacks] == ["TrainingHubEvents"]
    assert torch_args.model_dump() == {"nproc_per_node": 4, "nnodes": 2, "node_rank": 1, "rdzv_id": 77,
                                       "rdzv_endpoint": "head:29400", "master_addr": None, "master_port": None}


def test_instructlab_translation_defaults_and_pretokenized_pretraining(tiny_model_dir, monkeypatch):
    ilab = pytest.importorskip("instructlab.training")
    from instructlab.training import utils

    # its pre-launch checks, less the flash-attention probe, which needs CUDA
    monkeypatch.setattr(utils.Model, "check_flash_attn_enabled", staticmethod(lambda disabled: False))
    check_valid_train_args = utils.check_valid_train_args

    args, torch_args = instructlab_training_args(sft_config(nproc_per_node="auto", model_path=str(tiny_model_dir)),
                                                 DATA)
    check_valid_train_args(args)  # the library's own pre-launch checks accept the translation
    assert args.max_batch_len == args.max_seq_len == 2048  # our defaults, not the library's
    assert args.fsdp_options.sharding_strategy == ilab.FSDPOptions().sharding_strategy  # strategy not given
    assert args.validation_frequency is None and args.save_samples == 0
    assert torch_args.nproc_per_node == "gpu" and torch_args.rdzv_id == "training_hub"
    config = sft_config(is_pretraining=True, block_size=256, document_column_name="text", use_processed_dataset=True)
    args, _ = instructlab_training_args(config, EngineData("/x/data.jsonl", pretokenized=True))
    assert args.pretraining_config == ilab.PretrainingConfig(block_size=256, document_column_name="text")


def test_mini_trainer_translation_against_the_real_classes():
    mt = pytest.importorskip("mini_trainer")
    config = osft_config(unfreeze_rank_ratio=0.3, target_patterns=["q_proj", "down_proj"], num_epochs=2,
                         effective_batch_size=16, learning_rate=5e-6, max_seq_len=1024, max_tokens_per_gpu=8192,
                         warmup_steps=3, lr_scheduler="cosine", lr_scheduler_kwargs={"min_lr_ratio": 0.1},
                         beta1=0.85, beta2=0.98, eps=1e-7, weight_decay=0.01, seed=9, save_samples=160,
                         checkpoint_at_epoch=True, save_final_checkpoint=False, use_liger=True, dtype="float32",
                         validation_split=0.2, eval_steps=10, save_best_val_loss=True,
                         master_addr="10.0.0.1", master_port=29501, nnodes=2, node_rank=0)
    args, torch_args = mini_trainer_args(config, DATA)
    assert isinstance(args, mt.TrainingArgs) and isinstance(torch_args, mt.TorchrunArgs)
    assert (args.model_name_or_path, args.data_path, args.output_dir) == ("m", DATA.train_path, "/tmp/out")
    assert args.osft is True and args.osft_unfreeze_rank_ratio == 0.3
    assert args.osft_target_patterns == ["q_proj", "down_proj"]
    assert (args.batch_size, args.max_tokens_per_gpu, args.learning_rate) == (16, 8192, 5e-6)
    assert (args.training_mode, args.max_epochs, args.max_steps) == (mt.TrainingMode.EPOCH, 2, 0)
    assert (args.lr_scheduler, args.lr_scheduler_kwargs, args.num_warmup_steps) == (
        "cosine_with_min_lr", {"min_lr_rate": 0.1}, 3)
    assert (args.beta1, args.beta2, args.eps, args.weight_decay, args.seed) == (0.85, 0.98, 1e-7, 0.01, 9)
    assert (args.min_samples_per_checkpoint, args.checkpoint_at_epoch, args.save_final_checkpoint) == (160, True, False)
    assert (args.use_liger_kernels, args.train_dtype) == (True, "float32")
    assert (args.validation_split, args.validation_frequency, args.validate_at_epoch) == (0.2, 10, True)
    assert args.save_best_val_loss is True
    assert [type(c).__name__ for c in args.callbacks] == ["TrainingHubEvents"]
    assert (torch_args.nnodes, torch_args.node_rank, torch_args.master_addr, torch_args.master_port) == (
        2, 0, "10.0.0.1", 29501)


def test_mini_trainer_sft_is_osft_off(fake_cuda):
    pytest.importorskip("mini_trainer")
    from training_hub.algorithms.base import choose_backend
    from training_hub.backends.mini_trainer_osft import MiniTrainerSFTBackend

    args, _ = mini_trainer_args(sft_config(learning_rate=1e-5), DATA)
    assert args.osft is False and args.osft_unfreeze_rank_ratio is None and args.learning_rate == 1e-5
    assert AlgorithmRegistry.get_backend("sft", "mini-trainer") is MiniTrainerSFTBackend
    assert "train_dtype" in MiniTrainerSFTBackend.passthrough_params()
    assert "osft_unfreeze_rank_ratio" not in MiniTrainerSFTBackend.passthrough_params()
    call = dict(model_path="m", data_path="d.jsonl", ckpt_output_dir="out")
    assert choose_backend("sft", {**call, "train_dtype": "bfloat16"}) == "mini-trainer"  # its option, its engine


def test_mini_trainer_translation_steps_schedules_and_validation_file():
    mt = pytest.importorskip("mini_trainer")
    args, _ = mini_trainer_args(osft_config(max_steps=12, lr_scheduler="constant", warmup_steps=2),
                                EngineData("/c/data.jsonl", "/c/validation.jsonl"))
    assert (args.training_mode, args.max_steps) == (mt.TrainingMode.STEP, 12)
    assert args.lr_scheduler == "constant_with_warmup"
    assert (args.validation_data_path, args.validation_split, args.validate_at_epoch) == (
        "/c/validation.jsonl", 0.0, True)
    args, _ = mini_trainer_args(osft_config(lr_scheduler="linear"), DATA)
    assert (args.lr_scheduler, args.validation_data_path, args.validate_at_epoch) == ("linear", None, False)
    assert args.train_dtype == mt.TrainingArgs.__dataclass_fields__["train_dtype"].default  # dtype not given


@pytest.mark.parametrize("backend_cls,algo_params,needle", [
    (InstructLabTrainingSFTBackend, {"lr_scheduler": "linear"}, "lr_scheduler='linear'"),
    (InstructLabTrainingSFTBackend, {"max_grad_norm": 0.5}, "max_grad_norm=0.5"),
    (InstructLabTrainingSFTBackend, {"validation_split": 0.1}, "eval_steps"),
    (InstructLabTrainingSFTBackend, {"strategy": "ddp"}, "strategy='ddp'"),
    (MiniTrainerOSFTBackend, {"unfreeze_rank_ratio": 0.5, "dtype": "bfloat16"}, "no float32 master copy"),
    (MiniTrainerOSFTBackend, {"unfreeze_rank_ratio": 0.5, "resume": True}, "resume=True"),
    (MiniTrainerOSFTBackend, {"unfreeze_rank_ratio": 0.5, "lr_scheduler": "linear",
                              "lr_scheduler_kwargs": {"min_lr_ratio": 0.1}}, "lr_scheduler_kwargs"),
    (MiniTrainerOSFTBackend, {"unfreeze_rank_ratio": 0.5, "save_best_val_loss": True}, "validation data"),
])
def test_unsupported_parameters_refused_before_any_work(tmp_path, backend_cls, algo_params, needle):
    out = tmp_path / "out"
    params = {"model_path": "m", "data_path": "missing.jsonl", "ckpt_output_dir": str(out), **algo_params}
    with pytest.raises(ParameterError) as info:
        backend_cls().execute_training(params)
    assert needle in str(info.value) and "backend='native'" in str(info.value)
    assert not out.exists()


def test_same_values_as_the_engine_are_accepted():
    config = sft_config(lr_scheduler="cosine", max_grad_norm=1.0, strategy="fsdp2", dtype="bfloat16")
    assert InstructLabTrainingSFTBackend.refusals(config, {"lr_scheduler", "max_grad_norm", "strategy", "dtype"}) == []


@pytest.mark.parametrize("name,value", [("use_liger", True), ("use_processed_dataset", True)])
def test_upstream_names_take_effect_on_the_adapters(fake_cuda, name, value):
    from training_hub.config.upstream import warn_ignored

    config = osft_config(**{name: value})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UpstreamParameterWarning)
        warn_ignored(config, {name}, MiniTrainerOSFTBackend)
    with pytest.warns(UpstreamParameterWarning, match=name):
        warn_ignored(config, {name}, AlgorithmRegistry.get_backend("osft", "native"))


# ------------------------------------------------------------------------------------------------ pass-through


def test_engine_options_pass_through_to_the_adapter_only(no_cuda, tmp_path):
    pytest.importorskip("mini_trainer")
    call = dict(model_path="m", data_path="d.jsonl", ckpt_output_dir=str(tmp_path / "o"), unfreeze_rank_ratio=0.5)
    # accepted by validation: what stops this call is only the missing GPU
    with pytest.raises(RuntimeError, match="CUDA"):
        osft(**call, backend="mini-trainer", osft_upcast_dtype="bfloat16", save_dtype="bfloat16")
    with pytest.raises(ParameterError, match="osft_upcast_dtype: not a training_hub parameter; it is an option of "
                                             "the mini-trainer backend's engine, passed through only with "
                                             "backend='mini-trainer'"):
        osft(**call, osft_upcast_dtype="bfloat16")  # the default here is native
    with pytest.raises(ParameterError, match="osft_upcast_dtyp: unknown parameter"):
        osft(**call, backend="mini-trainer", osft_upcast_dtyp="bfloat16")


def test_options_the_adapter_owns_are_not_passed_through(no_cuda, tmp_path):
    pytest.importorskip("instructlab.training")
    with pytest.raises(ParameterError, match="chat_tmpl_path: unknown parameter"):  # our pipeline tokenizes
        sft("m", "d.jsonl", str(tmp_path / "o"), backend="instructlab-training", chat_tmpl_path="t.py")
    with pytest.raises(ParameterError, match="disable_flash_attn: not a training_hub parameter.*instructlab-training"):
        sft("m", "d.jsonl", str(tmp_path / "o"), disable_flash_attn=True)


def test_passed_options_win_and_are_checked_by_the_engine_classes():
    ilab = pytest.importorskip("instructlab.training")
    mt = pytest.importorskip("mini_trainer")
    args, _ = instructlab_training_args(sft_config(), DATA, options={
        "disable_flash_attn": True, "fsdp_options": {"cpu_offload_params": True}, "max_batch_len": 9000})
    assert args.disable_flash_attn and args.fsdp_options.cpu_offload_params and args.max_batch_len == 9000
    with pytest.raises(ValueError, match="log_level"):  # pydantic's ValidationError is a ValueError
        instructlab_training_args(sft_config(), DATA, options={"log_level": "LOUD"})
    args, _ = mini_trainer_args(osft_config(), DATA, {"osft_upcast_dtype": "bfloat16", "training_mode": "token",
                                                      "max_tokens": 10_000})
    assert (args.osft_upcast_dtype, args.training_mode, args.max_tokens) == ("bfloat16", mt.TrainingMode.TOKEN, 10_000)
    assert ilab  # imported for the skip


def test_refusals_see_only_our_parameters(tmp_path):
    pytest.importorskip("mini_trainer")
    params = dict(model_path="m", data_path="d.jsonl", ckpt_output_dir=str(tmp_path / "o"), unfreeze_rank_ratio=0.5,
                  dtype="bfloat16", osft_upcast_dtype="bfloat16")
    with pytest.raises(ParameterError) as info:
        MiniTrainerOSFTBackend().execute_training(params)
    assert info.value.problems[0].startswith("dtype='bfloat16'") and len(info.value.problems) == 2


# ------------------------------------------------------------------------------------------------ data


def test_prepared_data_reads_in_both_upstream_loaders(tmp_path, tiny_model_dir):
    ilab_sampler = pytest.importorskip("instructlab.training.sampler")
    mt_sampler = pytest.importorskip("mini_trainer.sampler")
    from transformers import AutoTokenizer

    from training_hub.data import prepare_sft_data

    config = sft_config(model_path=str(tiny_model_dir), data_path=str(demo_data_path()),
                        ckpt_output_dir=str(tmp_path / "out"), max_seq_len=256)
    data = prepare_engine_data(config, tmp_path / "out")
    ours = prepare_sft_data(str(demo_data_path()), AutoTokenizer.from_pretrained(tiny_model_dir),
                            max_seq_len=256).dataset
    for dataset in (ilab_sampler.TokenDataset(data.train_path), mt_sampler.JsonlDataset(data.train_path)):
        assert len(dataset) == len(ours) > 0
        for i in (0, len(ours) - 1):
            item = dataset[i]
            assert item["input_ids"].tolist() == ours[i]["input_ids"]
            assert item["labels"].tolist() == ours[i]["labels"]
            assert item["len"] == ours[i]["length"]
            assert item["num_loss_counted_tokens"] == ours[i]["num_loss_tokens"] > 0


def test_bad_data_fails_with_file_and_line_before_anything_is_written(tmp_path, tiny_model_dir):
    from training_hub.data import DataValidationError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": "oops"}\n')
    config = osft_config(model_path=str(tiny_model_dir), data_path=str(bad), ckpt_output_dir=str(tmp_path / "o"))
    with pytest.raises(DataValidationError, match=r"bad.jsonl:2"):
        prepare_engine_data(config, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_processed_dataset_passes_through(tmp_path):
    tokenized = tmp_path / "tokens.jsonl"
    tokenized.write_text(json.dumps({"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}) + "\n")
    config = sft_config(data_path=str(tokenized), ckpt_output_dir=str(tmp_path / "o"), use_processed_dataset=True)
    data = prepare_engine_data(config, tmp_path / "o")
    assert data.pretokenized and Path(data.train_path).name == "data.jsonl"
    assert Path(data.train_path).read_text() == tokenized.read_text()  # linked where instructlab-training looks
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match="chat.jsonl:1.*input_ids"):
        prepare_engine_data(sft_config(data_path=str(chat), use_processed_dataset=True), tmp_path / "p")


# ------------------------------------------------------------------------------------------------ events and runs

# Stands in for the upstream torchrun worker: rebuilds the callbacks from their CLI form with the package's own
# deserializer, fires them through its CallbackManager, reads the data with its loader and saves checkpoints.
STAND_IN = textwrap.dedent("""
    import importlib, json, shutil, sys, time
    from pathlib import Path
    package, encoded, data_path, output_dir, model_path, pause = sys.argv[1:]
    callbacks = importlib.import_module(package + ".callbacks")
    manager = callbacks.CallbackManager()
    for cb in callbacks.deserialize_callbacks_from_cli(encoded):
        manager.add_callback(cb)
    samples = sum(1 for _ in open(data_path))
    ctx = manager.context
    manager.fire("on_train_begin")
    manager.fire("on_epoch_begin")
    for step in (1, 2, 3):
        ctx.step = step
        manager.fire("on_step_begin")
        ctx.epoch, ctx.loss, ctx.learning_rate, ctx.grad_norm = 0, 3.0 / step, 1e-5 * step, 0.5
        ctx.total_samples, ctx.total_tokens = 4 * step, 100 * step
        manager.fire("on_step_end")
        time.sleep(float(pause))
    manager.fire("on_evaluate", val_metrics={"val_loss": 0.75, "val_num_samples": 2})
    final = Path(output_dir) / "hf_format" / f"samples_{samples}"
    shutil.copytree(model_path, final)
    manager.fire("on_save", checkpoint_path=str(final))
    manager.fire("on_epoch_end")
    manager.fire("on_train_end")
    time.sleep(0.5)
    manager.close()
""")


class UpstreamStyle(TrainingHubCallback):
    """A callback as written for the upstream Training Hub: every hook takes the context only."""

    def __init__(self):
        self.calls = []

    def on_epoch_begin(self, context):
        self.calls.append(("epoch_begin", context.step))

    def on_step_begin(self, context):
        self.calls.append(("step_begin", context.step))

    def on_log(self, context):
        self.calls.append(("log", context.step, context.loss, context.metrics["type"]))

    def on_save(self, context):
        self.calls.append(("save", Path(context.checkpoint_path).name))

    def on_epoch_end(self, context):
        self.calls.append(("epoch_end", context.step))

    def on_train_end(self, context):
        self.calls.append(("end", context.is_main_process, context.output_dir))


class Recorder(TrainingHubCallback):
    def __init__(self, fail_at_step=None):
        self.calls, self.fail_at_step = [], fail_at_step

    def on_train_begin(self, ctx):
        self.calls.append(("begin", ctx.backend))

    def on_step_end(self, ctx, metrics):
        self.calls.append(("step", ctx.step, metrics["loss"], metrics["lr"], ctx.samples_seen))
        if metrics["step"] == self.fail_at_step:
            raise RuntimeError("hook failed on purpose")

    def on_evaluate(self, ctx, metrics):
        self.calls.append(("evaluate", metrics["loss"]))

    def on_save(self, ctx, path):
        self.calls.append(("save", Path(path).name))

    def on_train_end(self, ctx, result):
        self.calls.append(("end", result.checkpoint_path))


def stand_in_launch(package, config, translate, pause=0.0):
    def launch(data):
        train_args, _ = translate(config, data)  # the real translation, then the stand-in instead of torchrun
        callbacks = importlib.import_module(package + ".callbacks")
        encoded = callbacks.serialize_callbacks_for_cli(train_args.callbacks)
        subprocess.run([sys.executable, "-c", STAND_IN, package, encoded, data.train_path,
                        config.ckpt_output_dir, config.model_path, str(pause)], check=True)
    return launch


import importlib  # noqa: E402  (used by stand_in_launch)


@pytest.mark.parametrize("package,algo", [("instructlab.training", "sft"), ("mini_trainer", "osft")])
def test_run_reports_metrics_callbacks_and_result(tmp_path, tiny_model_dir, package, algo):
    pytest.importorskip(package)
    recorder, upstream_style = Recorder(), UpstreamStyle()
    params = dict(model_path=str(tiny_model_dir), data_path=str(demo_data_path()),
                  ckpt_output_dir=str(tmp_path / "out"), max_seq_len=256, callbacks=[recorder, upstream_style],
                  tensorboard_log_dir=str(tmp_path / "tb"))
    if algo == "sft":
        config, translate, name = sft_config(**params), instructlab_training_args, "instructlab-training"
    else:
        config, translate, name = osft_config(**params), mini_trainer_args, "mini-trainer"
    result = run_adapter(config, backend=name, launch=stand_in_launch(package, config, translate))

    samples = sum(1 for _ in open(demo_data_path()))
    final = tmp_path / "out" / "hf_format" / f"samples_{samples}"
    assert result.status == "success" and result.checkpoint_path == str(final)
    assert result.metrics["steps"] == 3 and result.metrics["final_loss"] == pytest.approx(1.0)
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert [(r["step"], r["loss"], r["samples"], r["tokens"]) for r in train] == [
        (1, 3.0, 4, 100), (2, 1.5, 4, 100), (3, 1.0, 4, 100)]
    assert [r["loss"] for r in records if r["type"] == "validation"] == [0.75]
    lr = pytest.approx
    assert recorder.calls == [("begin", name), ("step", 1, 3.0, lr(1e-5), 4), ("step", 2, 1.5, lr(2e-5), 8),
                              ("step", 3, 1.0, lr(3e-5), 12), ("evaluate", 0.75), ("save", final.name),
                              ("end", str(final))]
    assert upstream_style.calls == [
        ("epoch_begin", 0), ("step_begin", 0), ("log", 1, 3.0, "train"), ("step_begin", 1), ("log", 2, 1.5, "train"),
        ("step_begin", 2), ("log", 3, 1.0, "train"), ("log", 3, 1.0, "validation"), ("save", final.name),
        ("epoch_end", 3), ("end", True, str(tmp_path / "out"))]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))  # the shared loggers ran here too
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(result.checkpoint_path)


def test_failing_hook_is_logged_and_the_run_goes_on(tmp_path, tiny_model_dir, caplog):
    pytest.importorskip("mini_trainer")
    recorder = Recorder(fail_at_step=1)
    config = osft_config(model_path=str(tiny_model_dir), data_path=str(demo_data_path()),
                         ckpt_output_dir=str(tmp_path / "out"), max_seq_len=256, callbacks=[recorder])
    result = run_adapter(config, backend="mini-trainer",
                          launch=stand_in_launch("mini_trainer", config, mini_trainer_args))
    assert result.metrics["steps"] == 3 and [c[0] for c in recorder.calls].count("step") == 3
    assert "Recorder.on_step_end raised; training goes on" in caplog.text


def test_a_failure_while_following_stops_the_engine(tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("mini_trainer")
    from training_hub.engine.reporter import RunReporter

    def broken(self, record):
        raise OSError("No space left on device")

    monkeypatch.setattr(RunReporter, "write", broken)  # e.g. metrics.jsonl cannot be written
    config = osft_config(model_path=str(tiny_model_dir), data_path=str(demo_data_path()),
                         ckpt_output_dir=str(tmp_path / "out"), max_seq_len=256)
    start = time.perf_counter()
    with pytest.raises(OSError, match="No space left"):
        run_adapter(config, backend="mini-trainer",
                     launch=stand_in_launch("mini_trainer", config, mini_trainer_args, pause=20))
    assert time.perf_counter() - start < 20  # the stand-in (a child process) was stopped, not waited for
    assert not (tmp_path / "out" / "hf_format").exists()


def test_engine_runs_in_the_calling_thread_and_its_failure_is_raised(tmp_path, tiny_model_dir):
    import signal

    config = osft_config(model_path=str(tiny_model_dir), data_path=str(demo_data_path()),
                         ckpt_output_dir=str(tmp_path / "out"), max_seq_len=256)

    def launch(data):
        # what the engines do for on_demand_checkpointing; Python allows it in the main thread only
        previous = signal.signal(signal.SIGUSR1, lambda *a: None)
        signal.signal(signal.SIGUSR1, previous)
        raise RuntimeError("Training failed. Please check the logs")

    with pytest.raises(RuntimeError, match="Training failed"):
        run_adapter(config, backend="mini-trainer", launch=launch)
    assert (tmp_path / "out" / "metrics.jsonl").exists() and not (tmp_path / "out" / "hf_format").exists()


def test_upstream_class_api(no_cuda, tmp_path):
    """The upstream docs' class-based use: the adapter classes are top-level names."""
    from training_hub import InstructLabTrainingSFTBackend as ILab, MiniTrainerOSFTBackend as MT, OSFTAlgorithm

    algorithm = OSFTAlgorithm(backend=MT())
    assert AlgorithmRegistry.get_backend("osft", "mini-trainer") is MT
    assert AlgorithmRegistry.get_backend("sft", "instructlab-training") is ILab
    with pytest.raises(RuntimeError, match="mini-trainer trains on CUDA GPUs only"):
        algorithm.train(model_path="m", data_path="d.jsonl", ckpt_output_dir=str(tmp_path / "o"),
                        unfreeze_rank_ratio=0.3, effective_batch_size=16, max_tokens_per_gpu=2048, max_seq_len=1024,
                        learning_rate=5e-6)
