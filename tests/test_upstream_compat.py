"""Upstream Training Hub calls (parameter sets of its README and examples) pass our validation unchanged.

A capturing backend stands in for training: each row checks which names warn (exactly one warning each) and
what the backend receives after upstream names are folded onto ours.
"""

from __future__ import annotations

import warnings

import pytest

from training_hub.registry import Backend

BASE = {"model_path": "/m", "data_path": "/d.jsonl", "ckpt_output_dir": "/out"}
OSFT_BASE = {**BASE, "unfreeze_rank_ratio": 0.25, "effective_batch_size": 16, "max_tokens_per_gpu": 2048,
             "max_seq_len": 1024, "learning_rate": 5e-6}

# (algorithm, upstream call, names that warn, values the backend must receive)
CALLS = [
    ("sft", {**BASE, "num_epochs": 3, "effective_batch_size": 8, "learning_rate": 2e-5, "max_seq_len": 2048,
             "max_tokens_per_gpu": 45000, "checkpoint_at_epoch": True, "accelerate_full_state_at_epoch": True},
     set(), {"max_tokens_per_gpu": 45000, "checkpoint_at_epoch": True}),
    ("sft", {**BASE, "num_epochs": 1, "effective_batch_size": 8, "learning_rate": 2e-5, "max_seq_len": 512,
             "data_output_dir": "/tmp/x", "save_samples": 0, "warmup_steps": 10, "is_pretraining": False,
             "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.0, "nproc_per_node": 8, "nnodes": 1,
             "node_rank": 0, "rdzv_id": 47, "rdzv_endpoint": "127.0.0.1:29500",
             "wandb_project": "p", "wandb_entity": "e", "wandb_run_name": "r", "tensorboard_log_dir": "/tb",
             "mlflow_tracking_uri": "file:///ml", "mlflow_experiment_name": "x", "mlflow_run_name": "y",
             "validation_split": 0.1, "validation_frequency": 50, "keep_last_checkpoint_only": True},
     set(), {"eval_steps": 50, "keep_last_n_checkpoints": 1, "nproc_per_node": 8}),
    ("sft", {**BASE, "accelerate_full_state_at_epoch": False, "use_processed_dataset": True},
     {"accelerate_full_state_at_epoch", "use_processed_dataset"}, {}),
    # examples/osft: the knobs of a production run
    ("osft", {**OSFT_BASE, "num_epochs": 2, "data_output_dir": "/dev/shm", "warmup_steps": 0,
              "unmask_messages": False, "use_liger": True, "osft_memory_efficient_init": True, "seed": 42,
              "lr_scheduler": "cosine", "checkpoint_at_epoch": True, "save_final_checkpoint": True,
              "nproc_per_node": 8, "nnodes": 1, "trust_remote_code": True,
              "lr_scheduler_kwargs": {"min_lr_ratio": 0.1}},
     {"use_liger", "osft_memory_efficient_init"}, {"seed": 42, "lr_scheduler": "cosine"}),
    # upstream signatures default every optional parameter to None; 'gpu' means one process per GPU
    ("osft", {**OSFT_BASE, "target_patterns": None, "seed": None, "use_liger": None, "lr_scheduler": None,
              "warmup_steps": None, "num_epochs": None, "nproc_per_node": "gpu", "save_final_checkpoint": None,
              "wandb_project": None, "callbacks": None},
     set(), {"nproc_per_node": "auto"}),
    ("osft", {**OSFT_BASE, "validation_split": 0.1, "validation_frequency": 100, "save_best_val_loss": True},
     {"save_best_val_loss"}, {"eval_steps": 100, "validation_split": 0.1}),
    # the upstream lora_sft README (Unsloth backend names)
    ("lora_sft", {**BASE, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                  "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "num_epochs": 3,
                  "learning_rate": 2e-4, "max_seq_len": 2048, "micro_batch_size": 2,
                  "gradient_accumulation_steps": 4, "lr_scheduler": "linear", "warmup_steps": 10,
                  "load_in_4bit": False, "flash_attention": True, "sample_packing": True, "bf16": True,
                  "save_steps": 500, "logging_steps": 10, "save_total_limit": 3, "dataset_type": "chat_template",
                  "field_messages": "messages", "wandb_project": "lora"},
     {"flash_attention", "sample_packing"},
     {"effective_batch_size": 8, "dtype": "bfloat16", "save_samples": 4000, "keep_last_n_checkpoints": 3}),
    ("lora_sft", {**BASE, "load_in_8bit": True, "use_rslora": True, "dataset_type": "alpaca",
                  "field_instruction": "instruction", "bnb_4bit_quant_type": "nf4", "fp16": True,
                  "save_model": False},
     {"load_in_8bit", "use_rslora", "dataset_type", "field_instruction", "fp16"}, {"save_final_checkpoint": False}),
]


@pytest.fixture
def capture(clean_registry):
    received: list[dict] = []

    class Capture(Backend):
        def execute_training(self, algorithm_params):
            received.append(algorithm_params)
            return algorithm_params

    for algorithm in ("sft", "osft", "lora_sft"):
        clean_registry.register_backend(algorithm, "capture", Capture)
    return received


@pytest.mark.parametrize("algorithm,call,warned,expected", CALLS)
def test_upstream_call_validates_and_warns_once_per_ignored_name(capture, algorithm, call, warned, expected):
    import training_hub

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        getattr(training_hub, algorithm)(backend="capture", **call)
    from training_hub import UpstreamParameterWarning

    messages = [str(w.message) for w in caught if issubclass(w.category, UpstreamParameterWarning)]
    named = [m.split("=", 1)[0] for m in messages]
    assert sorted(named) == sorted(warned)  # one warning per ignored name, none for the others
    assert all("is ignored: " in m for m in messages)
    (params,) = capture
    for name, value in expected.items():
        assert params[name] == value


def test_unknown_names_still_fail_with_a_hint(capture):
    from training_hub import sft

    with pytest.raises(ValueError, match="use_ligr: unknown parameter; did you mean 'use_liger'"):
        sft(backend="capture", **BASE, use_ligr=True)


def test_every_upstream_name_is_declared():
    """The named upstream parameters of sft(), osft() and lora_sft() are all in our declarations."""
    from training_hub.algorithms import LoRASFTConfig, OSFTConfig, SFTConfig
    from training_hub.config import param_specs

    shared = {"model_path", "data_path", "ckpt_output_dir", "num_epochs", "effective_batch_size", "learning_rate",
              "max_seq_len", "max_tokens_per_gpu", "data_output_dir", "save_samples", "warmup_steps",
              "accelerate_full_state_at_epoch", "checkpoint_at_epoch", "is_pretraining", "block_size",
              "document_column_name", "beta1", "beta2", "eps", "weight_decay", "nproc_per_node", "nnodes",
              "node_rank", "rdzv_id", "rdzv_endpoint", "master_addr", "master_port", "wandb_project",
              "wandb_entity", "wandb_run_name", "tensorboard_log_dir", "mlflow_tracking_uri",
              "mlflow_experiment_name", "mlflow_run_name", "callbacks", "validation_split", "validation_frequency",
              "keep_last_checkpoint_only", "use_liger", "use_processed_dataset", "unmask_messages", "seed",
              "lr_scheduler", "lr_scheduler_kwargs", "save_final_checkpoint", "trust_remote_code"}
    osft_only = {"unfreeze_rank_ratio", "target_patterns", "osft_memory_efficient_init", "save_best_val_loss"}
    lora_only = {"lora_r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora",
                 "init_lora_weights", "rank_pattern", "alpha_pattern", "loftq_config", "load_in_4bit",
                 "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant",
                 "micro_batch_size", "gradient_accumulation_steps", "max_grad_norm", "flash_attention",
                 "sample_packing", "bf16", "fp16", "tf32", "save_steps", "eval_steps", "logging_steps",
                 "save_total_limit", "dataset_type", "field_messages", "field_instruction", "field_input",
                 "field_output", "enable_model_splitting", "finetune_vision_layers", "finetune_language_layers",
                 "save_model"}
    assert shared - set(param_specs(SFTConfig)) == set()
    assert (shared | osft_only) - set(param_specs(OSFTConfig)) == set()
    assert (shared | lora_only) - set(param_specs(LoRASFTConfig)) == set()


# An upstream-style user script, run as a program: its callback class lives in __main__ (so its source must travel
# to the two workers the call launches), it passes upstream parameter names and plots with the upstream signature.
SCRIPT = '''
import os
import sys

from training_hub import TrainingHubCallback, TrainingHubContext, osft, plot_loss


class StepPrinter(TrainingHubCallback):
    """Module level, imports inside the hooks, as upstream asks of callbacks for torchrun backends."""

    def on_train_begin(self, context: TrainingHubContext) -> None:
        print(f"[BEGIN] main={context.is_main_process}", flush=True)

    def on_log(self, context: TrainingHubContext) -> None:
        print(f"[LOG] step={context.step} loss={context.loss:.4f} lr={context.learning_rate}", flush=True)

    def on_train_end(self, context: TrainingHubContext) -> None:
        print(f"[END] step={context.step}", flush=True)


def main():
    model, data, out = sys.argv[1:4]
    os.makedirs(out, exist_ok=True)  # upstream examples create the output directory first
    result = osft(model_path=model, data_path=data, ckpt_output_dir=out, unfreeze_rank_ratio=0.25,
                  effective_batch_size=8, max_tokens_per_gpu=2048, max_seq_len=256, learning_rate=1e-3,
                  num_epochs=1, nproc_per_node=2, nnodes=1, node_rank=0, rdzv_id=100, checkpoint_at_epoch=True,
                  save_final_checkpoint=None,
                  use_liger=None, seed=42, lr_scheduler="cosine", warmup_steps=0, callbacks=[StepPrinter()])
    print("CHECKPOINT", result["checkpoint_path"], "PROCESSES", result["metrics"]["num_processes"], flush=True)
    print("PLOT", plot_loss(out, ema=True), flush=True)


if __name__ == "__main__":
    main()
'''


@pytest.mark.slow
def test_an_upstream_style_script_runs_unchanged(tmp_path, tiny_model_dir):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from training_hub.tiny import demo_data_path

    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(demo_data_path().read_text().splitlines()[:32]) + "\n")
    script = tmp_path / "upstream_script.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(data), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # 32 samples, 8 per step
    assert [x for x in lines if x.startswith("[BEGIN]")] == ["[BEGIN] main=True"]  # rank 0 only
    assert [int(x.split()[1].split("=")[1]) for x in lines if x.startswith("[LOG]")] == steps
    assert "[END] step=4" in lines
    assert f"CHECKPOINT {out / 'hf_format' / 'samples_32.0'} PROCESSES 2" in lines  # upstream OSFT's name
    assert f"PLOT {out / 'loss_plot.png'}" in lines and Path(out / "loss_plot.png").stat().st_size > 5000
