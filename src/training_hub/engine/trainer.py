"""The native SFT loop (also OSFT and LoRA, through a ``TrainingMethod``), as a recipe of the run skeleton.

``train_sft(config)`` is what the ``native`` backend runs. It reads top to bottom: set up (process group, data,
model, optimizer), then :func:`training_hub.engine.run.execute` drives the epochs and calls back into
:class:`SFTRecipe` for what only SFT knows: its step (token-budget micro-batches packed without padding, the loss
summed over the step's loss-bearing tokens, see ``loss``), its validation loss, and how its checkpoints are
written (HF format; FSDP2 gathers the shards, once per save; OSFT and LoRA export through their method; under FSDP2
the training state is written in shards by every rank, ``engine.sharded``).

Inside a torchrun worker this is one rank of the run (see ``engine.distributed``): every rank returns the same
result, rank 0 alone writes.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable

import torch

from training_hub.config.groups import fsdp_cpu_offload
from training_hub.config.processes import in_torchrun_worker, launch_plan
from training_hub.data.sources import fingerprint
from training_hub.data.training import TrainingData, prepare_training_data
from training_hub.engine import checkpoint as ckpt
from training_hub.engine import distributed, plan, storage
from training_hub.engine.batching import Step, config_epoch, pack, pack_into_micro_batches
from training_hub.engine.compile import compile_model
from training_hub.engine.loss import fused_head_loss, num_targets, step_loss_and_backward, token_loss_sum
from training_hub.engine.method import TrainingMethod
from training_hub.engine.loading import build_model
from training_hub.engine.model import device_and_autocast
from training_hub.engine.run import (
    Progress, Run, StepOutcome, execute, optimizer_and_scheduler, resume, run_plan, seed_everything, total_steps,
)
from training_hub.result import TrainingResult

logger = logging.getLogger(__name__)


def check_supported(config: Any) -> None:
    """``train_sft`` is one process of a run: several are started by ``run_training`` (or the user's torchrun)."""
    if not in_torchrun_worker() and launch_plan(config).world_size > 1:
        raise ValueError(
            f"nproc_per_node={config.nproc_per_node}, nnodes={config.nnodes}: train_sft() is one process of a run; "
            "start several through sft()/osft() (they launch torchrun) or training_hub.engine.launch.run_training(), "
            "or run your script under torchrun.")


def collate(dataset, indices: list[int], device: torch.device) -> dict:
    """Fetch samples by index and pack them into one row (see ``batching.pack``)."""
    rows = dataset[indices]
    return pack(rows["input_ids"], rows["labels"], device=device)


@torch.no_grad()
def validation_loss(model, dataset, max_tokens: int, device, autocast,
                    ranks: distributed.Ranks = distributed.SINGLE) -> tuple[float, int]:
    """Mean token loss over the whole validation set, in token-budget micro-batches (dealt round-robin to ranks)."""
    model.eval()
    lengths = dataset["length"]
    micro_batches = [micro for start in range(0, len(lengths), 512)
                     for micro in pack_into_micro_batches(list(range(start, min(start + 512, len(lengths)))),
                                                          lengths, max_tokens)]
    mine = micro_batches[ranks.rank::ranks.world_size]
    passes = -(-len(micro_batches) // ranks.world_size)  # every rank runs as many forwards (FSDP2 all-gathers)
    total, targets = 0.0, 0
    for k in range(passes):
        row = collate(dataset, mine[k], device) if k < len(mine) else distributed.empty_micro_batch(device)
        with autocast():
            total = total + token_loss_sum(model, row).detach().float()  # read once, after the loop
        targets += num_targets(row)
    total, targets = distributed.all_sum(ranks, float(total), targets)
    model.train()
    return total / max(targets, 1), int(targets)


class SFTRecipe:
    """SFT's own parts of a run (see ``engine.run``); built by :func:`train_sft` once everything is set up."""

    def __init__(self, config: Any, *, method: TrainingMethod, ranks: distributed.Ranks, device: torch.device,
                 autocast, data: TrainingData, tokenizer, raw: torch.nn.Module, model: torch.nn.Module,
                 save_dtype: torch.dtype, trainable: list, optimizer, scheduler, root: Path):
        self.config, self.method, self.ranks, self.device, self.autocast = config, method, ranks, device, autocast
        self.data, self.tokenizer, self.raw, self.model, self.save_dtype = data, tokenizer, raw, model, save_dtype
        self.trainable, self.optimizer, self.scheduler, self.root = trainable, optimizer, scheduler, root
        self.lengths = data.train["length"]
        self.head_loss = fused_head_loss(getattr(config, "use_liger", False), device)  # None: our chunked loss

    def plan_epoch(self, epoch: int) -> list[Step]:
        return config_epoch(self.config, self.lengths, self.data.max_tokens, epoch, num_ranks=self.ranks.world_size,
                            rank=self.ranks.rank)

    def train_step(self, step: Step, stop: Callable[[], bool]) -> StepOutcome:
        """Forward/backward the step's micro-batches (the loss is the mean over the step's loss tokens, across
        ranks), then clip, step the optimizer and the schedule."""
        ranks, model, device = self.ranks, self.model, self.device
        rows = [collate(self.data.train, micro, device) for micro in step.micro_batches]
        if ranks.distributed:  # same number of passes on every rank; loss tokens counted globally
            rows += [distributed.empty_micro_batch(device)] * (step.max_micro_batches - len(rows))
            (global_targets,) = distributed.all_sum(ranks, sum(num_targets(row) for row in rows))
            loss, loss_tokens = step_loss_and_backward(
                model, rows, self.autocast, total_targets=int(global_targets), grad_scale=ranks.world_size,
                accumulate=distributed.no_sync(model), head_loss=self.head_loss, on_host=False)
            # full_like, not torch.tensor: a host-to-device copy would wait for the queued backward to finish
            loss = distributed.all_sum_on_device(ranks, torch.stack([loss, torch.full_like(loss, float(stop()))]))
        else:
            loss, loss_tokens = step_loss_and_backward(model, rows, self.autocast, head_loss=self.head_loss,
                                                       on_host=False)
        self.method.before_step(self.raw)
        clip = self.config.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip)  # clips on the device, without a host sync
        *values, grad_norm = distributed.host_floats(loss, norm)  # the step's one host sync
        loss, stopped = values[0], (values[1] > 0 if ranks.distributed else None)  # ranks stop together
        lr = self.scheduler.get_last_lr()[0]
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # the run stops here (engine.run): apply nothing
            self.optimizer.zero_grad(set_to_none=True)
            return StepOutcome(loss=loss, lr=lr, grad_norm=grad_norm, loss_tokens=loss_tokens)
        self.optimizer.step()
        self.method.after_step(self.raw)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(loss=loss, lr=lr, grad_norm=grad_norm, loss_tokens=loss_tokens,
                           stop=stop() if stopped is None else stopped)

    def validate(self) -> dict:
        loss, targets = validation_loss(self.model, self.data.validation, self.data.max_tokens, self.device,
                                        self.autocast, self.ranks)
        return {"loss": loss, "loss_tokens": targets}

    def save_checkpoint(self, samples_seen: int) -> Path | None:
        gathered = distributed.full_model_state(self.model, self.ranks)  # FSDP2: every rank takes part; else None
        if not self.ranks.is_main:
            return None
        method, raw = self.method, self.raw
        weights = method.export_state_dict(raw) if gathered is None else (
            method.export_state_dict(raw, gathered) or gathered)
        return ckpt.save_hf_checkpoint(raw, self.tokenizer, self.root, samples_seen, self.save_dtype,
                                       state_dict=weights, save_model=method.save_model,
                                       float_name=method.float_checkpoint_names)

    def save_state(self, progress: dict) -> None:
        if self.ranks.fsdp:  # each rank writes its shards, nothing is gathered (engine.sharded)
            from training_hub.engine import sharded

            if sharded.save(self.root, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                            progress=progress, ranks=self.ranks):
                return
        model_state, optimizer_state = distributed.full_training_state(self.model, self.optimizer, self.ranks)
        if self.ranks.is_main:
            ckpt.save_training_state(self.root, model=self.raw, optimizer=self.optimizer, scheduler=self.scheduler,
                                     progress=progress, model_state=model_state, optimizer_state=optimizer_state)

    def load_state(self, path: Path) -> dict:
        if self.ranks.fsdp and ckpt.is_sharded(path):  # every rank reads its shards (DCP reshards)
            from training_hub.engine import sharded

            sharded.load(path, model=self.model, optimizer=self.optimizer, ranks=self.ranks)
        elif self.ranks.fsdp:  # a one-process state: rank 0 reads it, every rank loads its shards
            distributed.load_full_training_state(self.model, self.optimizer, path, self.ranks)
        return ckpt.load_training_state(path, model=None if self.ranks.fsdp else self.raw,
                                        optimizer=None if self.ranks.fsdp else self.optimizer,
                                        scheduler=self.scheduler, device=self.device, rank=self.ranks.rank)

    def result_metrics(self, progress: Progress) -> dict:
        return {"final_loss": progress.last.get("loss"), "validation_loss": progress.last_validation.get("loss")}


def train_sft(config: Any, method: TrainingMethod | None = None) -> TrainingResult:
    """Train ``config.model_path`` on ``config.data_path`` (an ``SFTConfig``) and return a ``TrainingResult``.

    ``method`` adapts the loop for SFT-style algorithms such as OSFT or LoRA (see ``engine.method``).
    """
    check_supported(config)
    ranks = distributed.setup(config.strategy)
    try:
        return train_sft_rank(config, method or TrainingMethod(), ranks)
    except BaseException:
        distributed.teardown(ranks, wait=False)  # a failing rank must not wait for the others (they may be gone)
        raise


def train_sft_rank(config: Any, method: TrainingMethod, ranks: distributed.Ranks) -> TrainingResult:
    """The body of :func:`train_sft` on one rank, after the process group is set up."""
    from transformers import AutoTokenizer

    root = Path(config.ckpt_output_dir)
    resume_from = distributed.broadcast(ranks, storage.open_output_dir(config, root) if ranks.is_main else None)
    device, autocast, compute = device_and_autocast(config)
    seed_everything(config.seed)

    tokenizer = AutoTokenizer.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code)
    with distributed.main_first(ranks):  # the others then find rank 0's cache
        data = prepare_training_data(config, tokenizer, root, verbose=ranks.is_main)  # before any write
    from training_hub.fsutil import claim_directory
    with claim_directory(root, claim=ranks.is_main):  # creates root; one live run per output directory
        steps_per_epoch, total = total_steps(config, len(data.train))
        progress = Progress(plan=run_plan(config, fingerprint(config.data_path), max_tokens_per_gpu=data.max_tokens,
                                          num_train_samples=len(data.train), **method.plan_keys()))

        plan.check_fits(config, method, lambda: plan.sft_run_data(data, tokenizer), device)  # CUDA: before loading
        raw, model, save_dtype = build_model(  # model: what the loop calls (raw, DDP(raw) or raw made FSDP2);
            config, method, ranks, device,      # under FSDP2 only rank 0 reads the weights
            cpu_offload=fsdp_cpu_offload(getattr(config, "fsdp_options", None)), param_dtype=compute)
        compile_model(raw, config, device, fsdp=ranks.fsdp)  # torch_compile: regional, self-checked (engine.compile)
        trainable = [p for p in raw.parameters() if p.requires_grad]
        optimizer, scheduler = optimizer_and_scheduler(config, trainable, total)
        recipe = SFTRecipe(config, method=method, ranks=ranks, device=device, autocast=autocast, data=data,
                           tokenizer=tokenizer, raw=raw, model=model, save_dtype=save_dtype, trainable=trainable,
                           optimizer=optimizer, scheduler=scheduler, root=root)
        if resume_from is not None:
            resume(recipe, progress, config, total, resume_from)
        run = Run(config, root=root, ranks=ranks, device=device, steps_per_epoch=steps_per_epoch, total_steps=total,
                  progress=progress, resumed=resume_from is not None, desc="sft")
        return execute(run, recipe, has_validation=data.validation is not None)
