"""The parameters of ``grpo()`` and ``lora_grpo()``: upstream Training Hub 0.11's names and defaults, plus ours.

Upstream runs GRPO on vLLM engines (ART, verl); the names that only mean something to those engines are accepted
and ignored with one warning each. An *iteration* is one batch of ``prompt_batch_size`` prompts (drawn anew each
iteration, seeded) with ``group_size`` sampled completions each, scored, and trained on with
``updates_per_batch`` optimizer steps (ART's iteration; verl's "epochs" are passes over the data instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

from training_hub.config.algorithms import LoRAParams
from training_hub.config.declare import DeclaredConfig, ignored, param
from training_hub.config.groups import CheckpointParams, LoggingParams, OptimizerParams, RuntimeParams


@dataclass(kw_only=True)
class GRPOParams(DeclaredConfig):
    group_title = "GRPO"

    model_path: str = param(doc="Hugging Face model directory (or hub id already in the local cache) to start from.")
    ckpt_output_dir: str = param(doc="Directory for checkpoints, metrics.jsonl and training state.")
    data_path: Optional[str] = param(
        None, "Prompts: JSONL/JSON/parquet rows with 'question' (or 'messages') and 'ground_truth' (or 'answer'); "
              "other fields are kept and passed to reward_fn.")
    tasks: Optional[list] = param(None, "The same rows as a Python list, instead of data_path.", cli=False)
    n_train: int = param(5000, "Use the first N rows for training.", gt=0)
    n_val: int = param(500, "Hold out the next N rows: their mean reward (greedy completions) is the validation "
                            "at the end of the run.", ge=0)
    system_prompt: Optional[str] = param(None, "System message put before each 'question' row's question.")
    data_source: str = param("generic", "The data_source passed to reward_fn (a row's own 'data_source' wins).")
    reward_fn: Optional[Callable] = param(
        None, "reward_fn(data_source=, solution_str=, ground_truth=, **row_fields) -> float (default: 1.0 when the "
              "completion, stripped, equals the ground truth); on the command line a dotted path (my_module.fn).")
    rollout_fn: Optional[Callable] = param(
        None, "Upstream ART custom rollouts (async, over an OpenAI client); not supported by the native and trl "
              "backends, which generate with the policy itself: give data_path or tasks and a reward_fn.")
    num_iterations: int = param(15, "GRPO iterations: batches of prompts generated, scored and trained on.", gt=0)
    group_size: int = param(8, "Completions sampled per prompt; advantages are relative to the group.", ge=2)
    prompt_batch_size: int = param(100, "Prompts per iteration (at most the number of training rows).", gt=0)
    temperature: float = param(0.7, "Sampling temperature of the rollouts (the loss uses the same tempered "
                                    "log-probabilities, as TRL and verl do).", gt=0.0)
    max_tokens: int = param(512, "Longest completion, in tokens (generation stops at EOS or here).", gt=0)
    max_prompt_length: int = param(16384, "Longest prompt, in tokens; longer rows are dropped with a warning.", gt=0)
    use_dr_grpo: bool = param(True, "Dr. GRPO: advantages not divided by the group's reward std, and a constant "
                                    "length normaliser (max_tokens); False: GRPO (std-scaled, per-completion mean).")
    beta: float = param(0.0, "Weight of the KL penalty to the starting model (0: no reference model, as Dr. GRPO).",
                        ge=0.0)
    epsilon: float = param(0.2, "Clip range of the policy ratio (matters with updates_per_batch > 1).", gt=0.0)
    updates_per_batch: int = param(1, "Optimizer steps on each iteration's rollouts (TRL's num_iterations).", gt=0)
    generation_batch_size: Optional[int] = param(
        None, "Completions generated per generate() call (None: all of an iteration's at once).", gt=0)
    max_tokens_per_gpu: Optional[int] = param(
        None, "Token budget of one training micro-batch (default: max(4096, longest prompt + max_tokens)).", gt=0)
    iteration_callback: Optional[Callable] = param(
        None, "Called after every iteration as iteration_callback(iteration, results) with results['reward_history'], "
              "'mean_reward', ...; on the command line a dotted path.")
    n_gpus: int = param(1, "Processes (GPUs) per node; the built-in backends train in one process.", gt=0)
    nnodes: int = param(1, "Number of nodes; the built-in backends train on one.", gt=0)
    trust_remote_code: bool = param(False, "Allow model code from the model directory (transformers' trust_remote_code).")
    seed: int = param(42, "Seed of the prompt draws, the sampling and the adapter's initialisation.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = param("constant", "Learning-rate schedule after warmup.")
    warmup_steps: int = param(0, "Linear warmup over this many optimizer steps.", ge=0)
    lr_scheduler_kwargs: Optional[dict] = param(None, "Extra schedule options, e.g. {'min_lr_ratio': 0.1}.")

    def checks(self) -> list[str]:
        problems = super().checks()
        if self.data_path is None and self.tasks is None and self.rollout_fn is None:
            problems.append("data_path: required (or tasks, the rows as a list)")
        if self.data_path is not None and self.tasks is not None and self.rollout_fn is None:
            problems.append("tasks: give data_path or tasks, not both")
        if self.rollout_fn is not None and self.tasks is None:
            problems.append("rollout_fn: upstream's custom rollouts come with tasks")
        return problems

    # What the run skeleton (engine.run) reads: one pass of num_iterations steps, no periodic validation.
    @property
    def num_epochs(self) -> int:
        return 1

    @property
    def eval_steps(self) -> None:
        return None

    @property
    def effective_batch_size(self) -> int:
        """Completions per iteration, when every iteration gets prompt_batch_size prompts."""
        return self.prompt_batch_size * self.group_size


def _vllm(what: str):
    return ignored(f"{what}; the native and trl backends generate with transformers in the training process")


@dataclass(kw_only=True)
class GRPOUpstreamParams(DeclaredConfig):
    """Upstream names that only mean something to a vLLM engine (ART, verl): accepted, one warning each."""

    data_config: Optional[str] = param(None, "Upstream: Hugging Face dataset config (ignored, with a warning).",
                                       upstream=ignored("data is read from data_path (a local file) or tasks"))
    concurrency: Optional[int] = param(None, "Upstream ART: concurrent rollouts (ignored, with a warning).",
                                       upstream=_vllm("concurrent rollouts are ART's"))
    gpu_memory_utilization: Optional[float] = param(
        None, "Upstream: vLLM's GPU memory share (ignored, with a warning).",
        upstream=_vllm("vLLM's memory share has no meaning here"))
    tensor_parallel_size: Optional[int] = param(None, "Upstream: vLLM tensor parallelism (ignored, with a warning).",
                                                upstream=_vllm("vLLM tensor parallelism has no meaning here"))
    max_lora_rank: Optional[int] = param(None, "Upstream: vLLM's largest LoRA rank (ignored, with a warning).",
                                         upstream=_vllm("vLLM's LoRA rank limit has no meaning here"))
    enforce_eager: Optional[bool] = param(None, "Upstream: vLLM eager mode (ignored, with a warning).",
                                          upstream=_vllm("vLLM's eager mode has no meaning here"))
    art_model_name: Optional[str] = param(None, "Upstream ART model name (ignored, with a warning).",
                                          upstream=ignored("ART registration is ART's"))
    art_project: Optional[str] = param(None, "Upstream ART project (ignored, with a warning).",
                                       upstream=ignored("ART registration is ART's"))
    art_path: Optional[str] = param(None, "Upstream ART storage path (ignored, with a warning; see ckpt_output_dir).",
                                    upstream=ignored("ART storage is ART's; everything is written to ckpt_output_dir"))


_LR_DOC = "Peak learning rate (upstream's default, 1e-5, suits billion-parameter models; tiny ones need ~1e-3)."


@dataclass(kw_only=True)
class GRPOConfig(GRPOUpstreamParams, LoggingParams, CheckpointParams, RuntimeParams, OptimizerParams, GRPOParams):
    """Every parameter of ``grpo()``: full-parameter GRPO."""

    algorithm_name = "grpo"

    learning_rate: float = param(1e-5, _LR_DOC, gt=0.0)


@dataclass(kw_only=True)
class LoRAGRPOParams(LoRAParams):
    """LoRA's parameters with upstream ``lora_grpo()``'s defaults (alpha 8; every linear layer)."""

    lora_alpha: float = param(8.0, "LoRA scaling numerator: the update is scaled by lora_alpha / lora_r.", gt=0.0)


@dataclass(kw_only=True)
class LoRAGRPOConfig(GRPOUpstreamParams, LoRAGRPOParams, LoggingParams, CheckpointParams, RuntimeParams,
                     OptimizerParams, GRPOParams):
    """Every parameter of ``lora_grpo()``: GRPO training LoRA adapters on a frozen base model."""

    algorithm_name = "lora_grpo"

    learning_rate: float = param(1e-5, _LR_DOC, gt=0.0)
    max_grad_norm: Optional[float] = param(0.1, "Clip the global gradient norm to this value (None: no clipping).",
                                           gt=0.0)

    def checks(self) -> list[str]:
        problems = super().checks()
        if self.load_in_4bit:
            problems.append("load_in_4bit: QLoRA is not available for lora_grpo; train plain LoRA")
        return problems
