"""The native GRPO loop, as a recipe of the run skeleton (``engine.run``): one optimizer step per iteration.

``train_grpo(config, method)`` is what the ``native`` grpo and lora_grpo backends run. Per iteration (a ``Step``
of the skeleton, so progress, signals, divergence, checkpoints, resume, metrics.jsonl, callbacks and loggers are the
skeleton's):

1. Draw ``prompt_batch_size`` training prompts (seeded by ``seed`` and the iteration: a resumed run draws the same).
2. Roll out: the policy itself samples ``group_size`` completions of each with transformers ``generate`` (batched,
   KV cache, ``temperature``, no top-k/top-p, until EOS or ``max_tokens``; EOS is part of the completion).
3. Score each completion with ``reward_fn`` (``data.grpo.RewardAdapter``); group-relative advantages
   (``losses.grpo.group_advantages``; Dr. GRPO: not divided by the group's std).
4. Train: prompt+completion sequences packed into token-budget micro-batches (``batching.pack``: no padding,
   attention kept inside each sequence, loss on the completion tokens only), log-probs under the tempered policy,
   the clipped policy-ratio loss (``losses.grpo.policy_loss``) with its per-token weights, ``updates_per_batch``
   optimizer steps on the same rollouts (``old`` log-probs taken before the first), optional KL to the starting
   model (``beta`` > 0: a frozen copy of it is kept).

metrics.jsonl per iteration: ``loss``, ``lr``, ``grad_norm``, ``reward`` (mean), ``reward_std``,
``completion_length`` (mean tokens), ``clip_fraction``, ``kl`` (with ``beta`` > 0), ``generation_seconds``,
and the skeleton's ``tokens_per_second`` (prompt + completion tokens over generation and training time).
LoRA trains through the engine's :class:`~training_hub.engine.lora.LoRAMethod` (checkpoints: the adapter).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from training_hub.data.grpo import RewardAdapter, Task, callable_name, load_tasks, tasks_fingerprint
from training_hub.engine import checkpoint as ckpt
from training_hub.engine import distributed, storage
from training_hub.engine.batching import IGNORE_INDEX, Step, pack, pack_into_micro_batches
from training_hub.engine.loss import packed_logits
from training_hub.engine.method import TrainingMethod
from training_hub.engine.model import device_and_autocast, load_model
from training_hub.engine.run import (
    Progress, Run, StepOutcome, execute, optimizer_and_scheduler, resume, run_plan, seed_everything,
)
from training_hub.losses.grpo import group_advantages, policy_loss, token_weights
from training_hub.result import TrainingResult

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- data

@dataclass
class Prompts:
    """Training and held-out tasks with their tokenized prompts, and the micro-batch token budget."""

    train: list[Task]
    train_ids: list[list[int]]
    validation: list[Task]
    validation_ids: list[list[int]]
    max_tokens: int


def prompt_ids(tokenizer, task: Task) -> list[int]:
    return list(tokenizer.apply_chat_template(task.messages, add_generation_prompt=True, tokenize=True)["input_ids"])


def prepare_prompts(config, tokenizer) -> Prompts:
    """Check every row, tokenize the prompts, drop those longer than ``max_prompt_length`` (with a warning)."""
    train, validation = load_tasks(config.data_path, config.tasks, n_train=config.n_train, n_val=config.n_val,
                                   system_prompt=config.system_prompt)
    kept = []
    for what, tasks in (("training", train), ("validation", validation)):
        ids = [prompt_ids(tokenizer, t) for t in tasks]
        fits = [i for i, p in enumerate(ids) if len(p) <= config.max_prompt_length]
        if len(fits) < len(ids):
            logger.warning("%d %s prompt(s) longer than max_prompt_length=%d tokens dropped (first: %s)",
                           len(ids) - len(fits), what, config.max_prompt_length,
                           next(t.where for i, t in enumerate(tasks) if i not in set(fits)))
        kept.append(([tasks[i] for i in fits], [ids[i] for i in fits]))
    if not kept[0][0]:
        raise ValueError(f"no training prompt fits max_prompt_length={config.max_prompt_length} tokens; raise it")
    longest = max(len(p) for p in kept[0][1] + kept[1][1]) + config.max_tokens
    budget = config.max_tokens_per_gpu or max(4096, longest)
    if budget < longest:
        raise ValueError(f"max_tokens_per_gpu={budget} is below the longest prompt plus max_tokens ({longest} "
                         f"tokens): one rollout could not fit a micro-batch; raise it to at least {longest}")
    return Prompts(kept[0][0], kept[0][1], kept[1][0], kept[1][1], budget)


# ---------------------------------------------------------------------------------------------------- rollouts

@contextlib.contextmanager
def generation_mode(model):
    """Eval mode and plain SDPA (the packed-attention kernel handles packed training rows, not a KV cache)."""
    previous, was_training = model.config._attn_implementation, model.training
    model.eval()
    if previous != "sdpa":
        model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        if previous != "sdpa":
            model.set_attn_implementation(previous)
        model.train(was_training)


def eos_ids(model, tokenizer) -> list[int]:
    found = model.generation_config.eos_token_id
    found = found if isinstance(found, list) else [found]
    return sorted({i for i in found + [tokenizer.eos_token_id] if i is not None})


@torch.no_grad()
def sample(model, tokenizer, prompts: list[list[int]], *, temperature: float | None, max_tokens: int, device,
           autocast, batch_size: int | None = None) -> list[list[int]]:
    """One completion per prompt (left-padded batches; ``temperature=None``: greedy), cut after the first EOS."""
    stops = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature else \
        dict(do_sample=False)
    out: list[list[int]] = []
    size = batch_size or len(prompts)
    with generation_mode(model):
        for start in range(0, len(prompts), size):
            chunk = prompts[start:start + size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            with autocast():
                generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                           eos_token_id=stops, pad_token_id=pad, use_cache=True, **sampling)
            for row in generated[:, width:].tolist():
                end = next((k + 1 for k, t in enumerate(row) if t in stops), len(row))
                out.append(row[:end])
    return out


@dataclass
class Rollouts:
    """One iteration's completions, grouped by prompt (``group_size`` consecutive entries per prompt)."""

    tasks: list[Task]  # one per completion
    prompts: list[list[int]]
    completions: list[list[int]]
    rewards: torch.Tensor
    advantages: torch.Tensor
    seconds: float

    def lengths(self) -> list[int]:
        return [len(p) + len(c) for p, c in zip(self.prompts, self.completions)]


def rollout(recipe: "GRPORecipe", iteration: int) -> Rollouts:
    """Draw the iteration's prompts, sample their groups, score them, compute the advantages."""
    config, data = recipe.config, recipe.data
    chosen = random.Random(f"{config.seed}:{iteration}").sample(range(len(data.train)),
                                                                min(config.prompt_batch_size, len(data.train)))
    tasks = [data.train[i] for i in chosen for _ in range(config.group_size)]
    prompts = [data.train_ids[i] for i in chosen for _ in range(config.group_size)]
    t0 = time.perf_counter()
    torch.manual_seed(config.seed * 1_000_003 + iteration)  # the same samples after a resume
    completions = recipe.generate(prompts)
    texts = recipe.tokenizer.batch_decode(completions, skip_special_tokens=True)
    rewards = torch.tensor([recipe.reward(task, text) for task, text in zip(tasks, texts)])
    advantages = group_advantages(rewards, config.group_size, scale=not config.use_dr_grpo)
    return Rollouts(tasks, prompts, completions, rewards, advantages, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------- loss

def collate(r: Rollouts, indices: list[int], device) -> dict:
    """Pack the sequences ``indices`` into one row; loss (targets) on their completion tokens only."""
    ids = [r.prompts[i] + r.completions[i] for i in indices]
    labels = [[IGNORE_INDEX] * len(r.prompts[i]) + r.completions[i] for i in indices]
    return pack(ids, labels, device=device)


def completion_logps(model, row: dict, temperature: float) -> torch.Tensor:
    """Log-probs of the row's completion tokens under the tempered policy, 1-D in row order."""
    logits = packed_logits(model, row, row["loss_index"]).float() / temperature
    return -F.cross_entropy(logits, row["targets"][0, row["loss_index"]], reduction="none")


@dataclass
class MicroBatch:
    """A packed row and, per completion token: advantage, loss weight, old and reference log-probs."""

    row: dict
    advantages: torch.Tensor
    weights: torch.Tensor
    old: torch.Tensor | None = None
    ref: torch.Tensor | None = None


def micro_batches(recipe: "GRPORecipe", r: Rollouts) -> list[MicroBatch]:
    """The step's micro-batches with their per-token tensors; old/reference log-probs where the loss needs them."""
    config, device = recipe.config, recipe.device
    lengths = r.lengths()
    plan = pack_into_micro_batches(list(range(len(lengths))), lengths, recipe.data.max_tokens)
    out = []
    for indices in plan:
        sizes = [len(r.completions[i]) for i in indices]
        weights = token_weights(sizes, len(lengths), config.max_tokens, config.use_dr_grpo)
        advantages = torch.repeat_interleave(r.advantages[indices], torch.tensor(sizes))
        out.append(MicroBatch(collate(r, indices, device), advantages.to(device),
                              torch.tensor(weights, device=device)))
    with torch.no_grad():
        for mb in out:
            if config.updates_per_batch > 1:
                with recipe.autocast():
                    mb.old = completion_logps(recipe.model, mb.row, config.temperature)
            if recipe.reference is not None:
                with recipe.autocast():
                    mb.ref = completion_logps(recipe.reference, mb.row, config.temperature)
    return out


def update(recipe: "GRPORecipe", micros: list[MicroBatch]) -> dict:
    """Forward and backward every micro-batch once; the accumulated gradient is that of the step's loss."""
    config = recipe.config
    loss_sum, clipped, kl, tokens = 0.0, 0, 0.0, 0
    for mb in micros:
        with recipe.autocast():
            logps = completion_logps(recipe.model, mb.row, config.temperature)
        old = mb.old if mb.old is not None else logps.detach()
        loss, sums = policy_loss(logps, old, mb.advantages, mb.weights, epsilon=config.epsilon, beta=config.beta,
                                 ref_logps=mb.ref)
        loss.backward()
        loss_sum += loss.item()
        clipped, kl, tokens = clipped + sums["clipped"], kl + sums["kl"], tokens + sums["tokens"]
    return {"loss": loss_sum, "clip_fraction": clipped / max(tokens, 1), "kl": kl / max(tokens, 1)}


# ---------------------------------------------------------------------------------------------------- recipe

class GRPORecipe:
    """GRPO's own parts of a run (see ``engine.run``); built by :func:`train_grpo` once everything is set up."""

    def __init__(self, config: Any, *, method: TrainingMethod, device: torch.device, autocast, data: Prompts,
                 tokenizer, model, reference, save_dtype: torch.dtype, optimizer, scheduler, root: Path,
                 reward: RewardAdapter):
        self.config, self.method, self.device, self.autocast, self.data = config, method, device, autocast, data
        self.tokenizer, self.model, self.reference, self.save_dtype = tokenizer, model, reference, save_dtype
        self.optimizer, self.scheduler, self.root, self.reward = optimizer, scheduler, root, reward
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.iteration, self.reward_history = 0, []

    def generate(self, prompts: list[list[int]]) -> list[list[int]]:
        c = self.config
        return sample(self.model, self.tokenizer, prompts, temperature=c.temperature, max_tokens=c.max_tokens,
                      device=self.device, autocast=self.autocast, batch_size=c.generation_batch_size)

    def plan_epoch(self, epoch: int) -> list[Step]:
        per_iteration = min(self.config.prompt_batch_size, len(self.data.train)) * self.config.group_size
        return [Step(micro_batches=[], num_samples=per_iteration, num_tokens=0)] * self.config.num_iterations

    def optimizer_step(self, loss: float) -> tuple[float, float, bool]:
        """Clip, then step the optimizer and the schedule unless the loss or the gradient is not finite:
        (lr, gradient norm, applied)."""
        self.method.before_step(self.model)
        norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, self.config.max_grad_norm or float("inf")))
        lr = self.scheduler.get_last_lr()[0]
        applied = math.isfinite(norm) and math.isfinite(loss)
        if applied:
            self.optimizer.step()
            self.method.after_step(self.model)
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr, norm, applied

    def train_step(self, step: Step, stop: Callable[[], bool]) -> StepOutcome:
        r = rollout(self, self.iteration)
        losses, first = [], None
        micros = micro_batches(self, r)
        for _ in range(self.config.updates_per_batch):
            stats = update(self, micros)
            lr, norm, applied = self.optimizer_step(stats["loss"])
            first = first or (lr, norm, stats)
            losses.append(stats["loss"])
            if not applied:
                break  # the skeleton stops the run on the non-finite value (applied ones are not saved)
        lr, norm, stats = first
        loss = sum(losses) / len(losses) if all(map(math.isfinite, losses)) else float("nan")
        ran = Step(micro_batches=[], num_samples=len(r.completions), num_tokens=sum(r.lengths()))
        extra = self.statistics(r, stats)
        self.iteration += 1
        self.reward_history.append(extra["reward"])
        if self.config.iteration_callback is not None:
            self.config.iteration_callback(self.iteration, {"iteration": self.iteration, "loss": loss, **extra,
                                                            "mean_reward": extra["reward"],
                                                            "reward_history": list(self.reward_history)})
        return StepOutcome(loss=loss, lr=lr, grad_norm=norm, loss_tokens=sum(len(c) for c in r.completions),
                           stop=stop(), extra=extra, step=ran)

    def statistics(self, r: Rollouts, stats: dict) -> dict:
        lengths = torch.tensor([len(c) for c in r.completions], dtype=torch.float)
        out = {"reward": r.rewards.mean().item(), "reward_std": r.rewards.std().item() if len(r.rewards) > 1 else 0.0,
               "completion_length": lengths.mean().item(), "clip_fraction": stats["clip_fraction"],
               "generation_seconds": round(r.seconds, 4)}
        if self.config.beta > 0:
            out["kl"] = stats["kl"]
        return out

    def validate(self) -> dict:
        completions = sample(self.model, self.tokenizer, self.data.validation_ids, temperature=None,
                             max_tokens=self.config.max_tokens, device=self.device, autocast=self.autocast,
                             batch_size=self.config.generation_batch_size)
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        rewards = [self.reward(t, text) for t, text in zip(self.data.validation, texts)]
        return {"reward": sum(rewards) / len(rewards), "prompts": len(rewards)}

    def save_checkpoint(self, samples_seen: int) -> Path | None:
        m = self.method
        return ckpt.save_hf_checkpoint(self.model, self.tokenizer, self.root, samples_seen, self.save_dtype,
                                       state_dict=m.export_state_dict(self.model), save_model=m.save_model,
                                       float_name=m.float_checkpoint_names)

    def save_state(self, progress: dict) -> None:
        progress = {**progress, "reward_history": list(self.reward_history)}
        ckpt.save_training_state(self.root, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                 progress=progress)

    def load_state(self, path: Path) -> dict:
        saved = ckpt.load_training_state(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                         device=self.device)
        self.iteration, self.reward_history = saved["global_step"], list(saved.get("reward_history", []))
        return saved

    def result_metrics(self, progress: Progress) -> dict:
        return {"final_loss": progress.last.get("loss"), "reward_history": list(self.reward_history),
                "final_mean_reward": self.reward_history[-1] if self.reward_history else None,
                "validation_reward": progress.last_validation.get("reward")}


# ---------------------------------------------------------------------------------------------------- setup

def load_tokenizer(config):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_reward(config) -> Callable:
    from training_hub.data.rewards import exact_match_reward

    return config.reward_fn or exact_match_reward


def train_grpo(config: Any, method: TrainingMethod | None = None) -> TrainingResult:
    """Train ``config.model_path`` with GRPO on the prompts of ``config.data_path`` (or ``config.tasks``)."""
    method = method or TrainingMethod()
    root = Path(config.ckpt_output_dir)
    resume_from = storage.open_output_dir(config, root)  # checkpoint_storage / enable_jit_checkpoint resume
    device, autocast, _ = device_and_autocast(config)
    seed_everything(config.seed)
    tokenizer = load_tokenizer(config)
    data = prepare_prompts(config, tokenizer)  # every row checked before anything is written
    reward = RewardAdapter(default_reward(config), config.data_source)
    print(f"grpo: {len(data.train)} training prompts, {len(data.validation)} held out; {config.num_iterations} "
          f"iterations of {min(config.prompt_batch_size, len(data.train))} prompts x {config.group_size} "
          "completions", file=sys.stderr)
    from training_hub.fsutil import claim_directory
    with claim_directory(root):  # creates root; one live run per output directory
        plan = run_plan(config, tasks_fingerprint(config.data_path, config.tasks), **method.plan_keys())
        plan.update(reward_fn=callable_name(config.reward_fn), iteration_callback=None, tasks=None, rollout_fn=None)
        progress = Progress(plan=plan)
        model, save_dtype = load_model(config, device)
        reference = copy.deepcopy(model).eval().requires_grad_(False) if config.beta > 0 else None
        method.prepare_model(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer, scheduler = optimizer_and_scheduler(config, trainable,
                                                       config.num_iterations * config.updates_per_batch)
        recipe = GRPORecipe(config, method=method, device=device, autocast=autocast, data=data, tokenizer=tokenizer,
                            model=model, reference=reference, save_dtype=save_dtype, optimizer=optimizer,
                            scheduler=scheduler, root=root, reward=reward)
        if resume_from is not None:
            resume(recipe, progress, config, config.num_iterations, resume_from)
        run = Run(config, root=root, ranks=distributed.SINGLE, device=device, steps_per_epoch=config.num_iterations,
                  total_steps=config.num_iterations, progress=progress, resumed=resume_from is not None, desc="grpo")
        result = execute(run, recipe, has_validation=bool(data.validation))
    result.extra["reward_history"] = list(result.metrics["reward_history"])
    return result
