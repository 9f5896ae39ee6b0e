"""The ``grpo`` and ``lora_grpo`` backends: our engine (``native``) and TRL's ``GRPOTrainer`` (``trl``).

Both read the same rows (:func:`training_hub.data.grpo.load_tasks`) and score with the same adapter
(:class:`training_hub.data.grpo.RewardAdapter`); both generate with transformers in the training process (no vLLM),
on CPU or one GPU. How our parameters map onto TRL's ``GRPOConfig``:

* one iteration = one TRL optimizer step over ``prompt_batch_size x group_size`` completions
  (``generation_batch_size`` = that, ``num_generations`` = ``group_size``); ``updates_per_batch`` = TRL's
  ``num_iterations``; ``max_steps`` = ``num_iterations x updates_per_batch``;
* ``use_dr_grpo=True`` = ``loss_type="dr_grpo"`` with ``scale_rewards="none"``; False = ``loss_type="grpo"`` with
  ``scale_rewards="group"``; ``beta``, ``epsilon``, ``temperature`` (top-k/top-p off), ``max_tokens`` =
  ``max_completion_length``;
* TRL draws the prompts with its own seeded sampler (the native engine draws ``random.Random(seed:iteration)``), so
  the two see the same data in a different order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Dict

from training_hub.backends.common import BuiltinBackend, add_lora_models, availability_of, native_only_problems
from training_hub.config.grpo import GRPOConfig, LoRAGRPOConfig
from training_hub.registry import Availability

ROLLOUT_FN = ("rollout_fn: upstream's custom rollouts run on ART (an async function over an OpenAI client to a "
              "vLLM server); the native and trl backends generate with the policy itself: give the prompts as "
              "data_path or tasks rows (question/messages, ground_truth) and score them with reward_fn")


def _one_process(config) -> list[str]:
    if config.n_gpus > 1 or config.nnodes > 1:
        return [f"n_gpus={config.n_gpus}, nnodes={config.nnodes}: the built-in GRPO backends train in one process "
                "(CPU or one GPU); use n_gpus=1 and nnodes=1"]
    return []


class NativeGRPOBackend(BuiltinBackend):
    """GRPO in our own engine: rollouts by the policy (transformers generate), packed training, HF checkpoints."""

    name, algorithm = "native", "grpo"
    needs: ClassVar[tuple[str, ...]] = ("torch", "transformers")
    install_hint: ClassVar[str] = "pip install training-hub"

    @classmethod
    def is_available(cls) -> Availability:
        return availability_of(cls.needs, cls.install_hint)

    @classmethod
    def config_class(cls) -> type:
        return GRPOConfig

    @classmethod
    def refusals(cls, config: Any, given: set[str]) -> list[str]:
        compiled = (["torch_compile: the grpo loop generates with a KV cache, which the compiled layers are not built "
                     "for; it is available for sft, osft, lora_sft and dpo"] if config.torch_compile else [])
        return ([ROLLOUT_FN] if config.rollout_fn is not None else []) + _one_process(config) + compiled

    def run(self, config: Any, given: set[str], options: Dict[str, Any]) -> Any:
        from training_hub.engine.grpo import train_grpo

        return train_grpo(config)


class NativeLoRAGRPOBackend(NativeGRPOBackend):
    """GRPO on LoRA adapters (the engine's LoRAMethod); checkpoints are the adapter in PEFT format, ``merge=True``
    also writes the merged model (``result["merged_path"]``)."""

    algorithm = "lora_grpo"
    needs = NativeGRPOBackend.needs + ("peft",)
    install_hint = "pip install training-hub[peft]"

    @classmethod
    def config_class(cls) -> type:
        return LoRAGRPOConfig

    def run(self, config: Any, given: set[str], options: Dict[str, Any]) -> Any:
        from training_hub.engine.grpo import train_grpo
        from training_hub.engine.lora import LoRAMethod

        return merged_and_models(train_grpo(config, method=LoRAMethod.from_config(config)), config)


def merged_and_models(result, config):
    """With ``merge=True`` the merged checkpoint (``result["merged_path"]``); ``result["model"]`` as lora_sft's."""
    if config.merge and result.checkpoint_path:
        from training_hub.lora_merge import merge_adapter

        merged = str(merge_adapter(result.checkpoint_path, Path(config.ckpt_output_dir) / "merged",
                                   trust_remote_code=config.trust_remote_code))
        result.metrics["merged_path"] = result.extra["merged_path"] = merged
    return add_lora_models(result, config)


# ------------------------------------------------------------------------------------------------ trl


def trl_reward(adapter, tasks: list):
    """A TRL reward function that scores each completion of a batch with our adapter (by the row's index)."""

    def reward(prompts, completions, task_index, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [adapter(tasks[i], text) for i, text in zip(task_index, texts)]

    reward.__name__ = getattr(adapter.fn, "__name__", "reward")
    return reward


def trl_arguments(config, root: Path, per_step: int):
    """TRL's ``GRPOConfig`` for our config (see the module doc)."""
    import torch
    from trl import GRPOConfig as TRLGRPOConfig

    from training_hub.backends.trl import STATE_DIR, _report_to
    from training_hub.engine.model import compute_dtype

    cuda = torch.cuda.is_available()
    bf16 = compute_dtype(config, torch.device("cuda" if cuda else "cpu")) == torch.bfloat16
    scheduler = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[config.lr_scheduler]
    return TRLGRPOConfig(
        output_dir=str(root / STATE_DIR), per_device_train_batch_size=per_step, gradient_accumulation_steps=1,
        steps_per_generation=1, num_generations=config.group_size, max_completion_length=config.max_tokens,
        temperature=config.temperature, top_k=0, top_p=1.0, beta=config.beta, epsilon=config.epsilon,
        num_iterations=config.updates_per_batch, loss_type="dr_grpo" if config.use_dr_grpo else "grpo",
        scale_rewards="none" if config.use_dr_grpo else "group", learning_rate=config.learning_rate,
        adam_beta1=config.beta1, adam_beta2=config.beta2, adam_epsilon=config.eps, weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm or 0.0, lr_scheduler_type=scheduler, warmup_steps=config.warmup_steps,
        max_steps=config.num_iterations * config.updates_per_batch, seed=config.seed, data_seed=config.seed,
        bf16=bf16, use_cpu=not cuda, use_vllm=False, logging_steps=1, disable_tqdm=config.disable_progress_bar,
        save_strategy="no", report_to=_report_to(config), dataloader_num_workers=0, log_completions=False,
        shuffle_dataset=True, remove_unused_columns=False)


class TRLGRPOBackend(NativeGRPOBackend):
    """GRPO with TRL's ``GRPOTrainer`` (transformers generation, no vLLM); the final model in ``hf_format``."""

    name = "trl"
    needs = ("torch", "transformers", "trl")
    install_hint = "pip install training-hub[trl]"

    @classmethod
    def refusals(cls, config: Any, given: set[str]) -> list[str]:
        problems = super().refusals(config, given) + native_only_problems(config)
        if config.resume:
            problems.append("resume: the trl grpo backend does not resume; use backend='native'")
        if config.save_samples:
            problems.append("save_samples: the trl grpo backend saves the final model only; use backend='native'")
        for name in ("checkpoint_storage", "enable_jit_checkpoint"):
            if getattr(config, name, None) not in (None, False, "pvc"):
                problems.append(f"{name}: the trl grpo backend neither mirrors nor resumes; use backend='native'")
        return problems

    def run(self, config: Any, given: set[str], options: Dict[str, Any]) -> Any:
        return train_trl(config, peft=None)


class TRLLoRAGRPOBackend(TRLGRPOBackend):
    """``lora_grpo`` with TRL's ``GRPOTrainer`` and a PEFT ``LoraConfig``; the final adapter in ``hf_format``."""

    algorithm = "lora_grpo"
    needs = TRLGRPOBackend.needs + ("peft",)

    @classmethod
    def config_class(cls) -> type:
        return LoRAGRPOConfig

    def run(self, config: Any, given: set[str], options: Dict[str, Any]) -> Any:
        from training_hub.engine.lora import LoRAMethod

        return merged_and_models(train_trl(config, peft=LoRAMethod.from_config(config).lora_config()), config)


def iteration_hook(config):
    """A TrainerCallback that keeps TRL's mean reward per generation (one per iteration) and calls
    ``iteration_callback(iteration, results)`` as the native engine does."""
    from transformers import TrainerCallback

    class Iterations(TrainerCallback):
        def __init__(self):
            self.history: list[float] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "reward" not in logs or not state.is_world_process_zero:
                return  # TRL logs the reward once per generation, not on the further updates of a batch
            self.history.append(float(logs["reward"]))
            if config.iteration_callback is not None:
                config.iteration_callback(len(self.history), {
                    "iteration": len(self.history), "loss": logs.get("loss"), "reward": self.history[-1],
                    "mean_reward": self.history[-1], "reward_std": logs.get("reward_std"),
                    "reward_history": list(self.history)})

    return Iterations()


def trl_trainer(config, root: Path, peft):
    """The GRPOTrainer for ``config`` (data checked first) and our metrics callback."""
    from datasets import Dataset
    from trl import GRPOTrainer

    from training_hub.backends.trl import METRICS_FILE, _load_model, _load_tokenizer, _metrics_callback
    from training_hub.backends.trl_bridge import hub_bridge
    from training_hub.data.grpo import RewardAdapter
    from training_hub.engine.grpo import default_reward, prepare_prompts

    tokenizer = _load_tokenizer(config)
    data = prepare_prompts(config, tokenizer)  # the native engine's checks and prompt-length policy
    adapter = RewardAdapter(default_reward(config), config.data_source)
    dataset = Dataset.from_list([{"prompt": t.messages, "task_index": i} for i, t in enumerate(data.train)])
    per_step = min(config.prompt_batch_size, len(data.train)) * config.group_size
    callback = _metrics_callback(root / METRICS_FILE, None)
    bridge = hub_bridge(config, callback.record)
    iterations = iteration_hook(config)
    trainer = GRPOTrainer(model=_load_model(config), reward_funcs=[trl_reward(adapter, data.train)],
                          args=trl_arguments(config, root, per_step), train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft, callbacks=[callback, bridge, iterations])
    return trainer, callback, bridge, iterations, per_step


def train_trl(config, peft):
    """Run TRL's GRPOTrainer; the result carries ``reward_history`` (TRL's mean reward per iteration)."""
    from training_hub.backends.trl import _check_output_dir, _train_and_save
    from training_hub.fsutil import claim_directory
    from training_hub.result import TrainingResult

    root = Path(config.ckpt_output_dir)
    _check_output_dir(root, False)
    with claim_directory(root):
        trainer, callback, bridge, iterations, per_step = trl_trainer(config, root, peft)
        path, metrics, last = _train_and_save(trainer, config, root, None, callback, cast_back=peft is None)
        samples = len(iterations.history) * per_step  # completions trained on, as the native engine names them
        if path is not None and path.name != f"samples_{samples}":
            path = path.rename(path.with_name(f"samples_{samples}"))
        metrics["samples"] = samples
        records = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines() if line.strip()]
        train = [r for r in records if r.get("type") == "train"]
        busy = sum(r.get("step_time", 0.0) for r in train)
        history = iterations.history
        bridge.saved(path)
        metrics.update(bridge.ctx.extra, reward_history=history, final_mean_reward=history[-1] if history else None,
                       tokens=train[-1].get("tokens_seen") if train else 0,
                       tokens_per_second=train[-1].get("tokens_seen", 0) / busy if train and busy else None)
        result = TrainingResult(status="success", checkpoint_path=str(path) if path else None, metrics=metrics,
                                output_dir=str(root), extra={"reward_history": history})
        bridge.end(result)
        return result
