"""Plan before you train: ``plan()``, and upstream's ``estimate()``/estimator classes/``time_estimate()`` on top.

Every figure comes from the engine's own planner (``training_hub.engine.plan``): the steps from the functions the
run plans its epochs with, memory from the run's model built on fake tensors and counted as every run counts its
own ledger (``result.metrics["memory"]``), time from timing a few of the run's own steps here or from a named GPU's
peak FLOP/s. Upstream's names and call shapes are kept (``estimate(training_method=..., num_gpus=..., ...)``
returns ``(low, expected, high)`` bytes per GPU); its formulas are not.

The estimators see no data set: they plan one micro-batch of ``max_tokens_per_gpu`` tokens (or, as upstream,
``batch_size * max_seq_len / num_gpus`` when smaller or when no budget is given), every token loss-bearing, on the
engine's CUDA defaults: bf16 autocast, activation checkpointing, FSDP2 over ``num_gpus``.
"""

from __future__ import annotations

import dataclasses
import math
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

__all__ = ["plan", "estimate", "time_estimate", "BasicEstimator", "OSFTEstimator", "OSFTEstimatorExperimental",
           "LoRAEstimator", "QLoRAEstimator"]

ALGORITHMS = {"sft": "sft", "osft": "osft", "lora_sft": "lora_sft", "lora": "lora_sft", "dpo": "dpo"}
GIB = 2 ** 30


def _algorithm(name: str) -> str:
    key = str(name).lower()
    if key not in ALGORITHMS:
        raise ValueError(f"plan: algorithm {name!r} is not planned; plan one of sft, osft, lora_sft, dpo")
    return ALGORITHMS[key]


def plan(algorithm: str, *, gpu: str | None = None, utilization: float | None = None, gpu_memory: int | None = None,
         calibrate: bool = True, backend: str | None = None, **params: Any):
    """Plan the run that ``training_hub.<algorithm>(**params)`` would perform, without performing it.

    Validates ``params`` as the algorithm does, reads and tokenizes the data as the run will (nothing is written
    into ``ckpt_output_dir``), and returns an ``engine.plan.Plan``: optimizer steps, samples, tokens, micro-batches
    and packing efficiency, the memory ledger per device (``plan.memory``; a table for one process, DDP and FSDP2
    with and without activation checkpointing in ``plan.memory_table``), and ``plan.time_seconds``: from timing a
    few of the run's steps on this machine (``calibrate``), or for ``gpu`` (e.g. "H100") from its peak bf16 FLOP/s
    at ``utilization`` (default 0.35). ``gpu_memory`` (bytes per device; default: the CUDA device's free memory)
    adds whether the run fits, and if not, what would make it fit. ``print(plan)`` shows the table;
    ``plan.to_dict()`` is the JSON of ``training-hub plan --json``. The plan is the native engine's run; with
    another ``backend`` it says so in ``plan.notes``.
    """
    from training_hub.algorithms.base import prepare_call
    from training_hub.backends.common import check_model
    from training_hub.engine.plan import plan_run

    name = _algorithm(algorithm)
    config = prepare_call(name, params).config
    check_model(config, name)
    if utilization is not None and not 0 < utilization <= 1:
        raise ValueError(f"utilization={utilization!r}: a share of the GPU's peak FLOP/s, 0 < utilization <= 1")
    planned = plan_run(config, name, calibrate=calibrate, gpu=gpu, utilization=utilization, gpu_memory=gpu_memory)
    if backend not in (None, "native"):
        planned.notes.append(f"this is the plan of the native engine's run; backend={backend!r} batches, stores and "
                             "times its run its own way")
    return planned


# ------------------------------------------------------------------------------------------------ upstream's API

def _defaults(config_class: type) -> dict:
    return {f.name: f.default for f in dataclasses.fields(config_class) if f.default is not dataclasses.MISSING}


def _bytes(n: float) -> str:
    return f"{n / GIB:.1f} GB" if abs(n) >= GIB / 10 else f"{n / 2 ** 20:.1f} MB"


class BasicEstimator:
    """Upstream's memory estimator for full fine-tuning (SFT), answered by the engine's planner.

    ``estimate()`` returns ``(low, expected, high)`` bytes per GPU. ``verbose``: 0 silent, 1 the verdict against
    ``gpu_memory``, 2 also the breakdown. ``use_liger`` is accepted and changes nothing (the native engine never
    materialises the full logits: its output loss is chunked).
    """

    algorithm = "sft"

    def __init__(self, num_gpus: int = 8, gpu_memory: int = 85899345920,
                 model_path: str = "ibm-granite/granite-3.3-8b-instruct", batch_size: int | None = None,
                 max_seq_len: int | None = None, max_tokens_per_gpu: int | None = None, use_liger: bool = False,
                 verbose: int = 1, trust_remote_code: bool = False, **method: Any):
        if not isinstance(num_gpus, int) or isinstance(num_gpus, bool) or num_gpus < 1:
            raise ValueError(f"num_gpus must be a positive integer, got {num_gpus!r}")
        self.num_gpus, self.gpu_memory, self.model_path = num_gpus, gpu_memory, model_path
        self.use_liger, self.verbose, self.trust_remote_code = use_liger, verbose, trust_remote_code
        self.max_seq_len = max_seq_len
        self.tokens_per_gpu = self._resolve_tokens_per_gpu(batch_size, max_seq_len, max_tokens_per_gpu)
        self.method = method
        self.breakdown: dict = {}

    def _resolve_tokens_per_gpu(self, batch_size, max_seq_len, max_tokens_per_gpu) -> int:
        per_gpu = batch_size * max_seq_len / self.num_gpus if batch_size and max_seq_len else None
        if per_gpu is None and max_tokens_per_gpu is None:
            raise ValueError("At least one of (batch_size, max_seq_len) or max_tokens_per_gpu must be provided")
        tokens = min(t for t in (per_gpu, max_tokens_per_gpu) if t is not None)
        return max(1, int(tokens))

    def _config(self) -> SimpleNamespace:
        from training_hub.config.algorithms import LoRASFTConfig, OSFTConfig

        values = {**_defaults(OSFTConfig), **_defaults(LoRASFTConfig), "unfreeze_rank_ratio": 0.25,
                  "model_path": self.model_path, "trust_remote_code": self.trust_remote_code, **self.method}
        return SimpleNamespace(**values)

    def _row(self) -> dict:
        """One micro-batch of ``tokens_per_gpu`` tokens in samples of ``max_seq_len``, every token loss-bearing."""
        from training_hub.engine.batching import pack

        length = min(self.max_seq_len or self.tokens_per_gpu, self.tokens_per_gpu)
        lengths = [length] * (self.tokens_per_gpu // length) + ([self.tokens_per_gpu % length] if
                                                                  self.tokens_per_gpu % length else [])
        return pack([[0] * n for n in lengths], [[1] * n for n in lengths])

    def _ledger(self) -> dict:
        import torch

        from training_hub.engine.plan import method_for, predict_memory

        config = self._config()
        strategy = "fsdp2" if self.num_gpus > 1 else "single"
        own, _ = predict_memory(config, lambda: method_for(self.algorithm, config), [self._row()], torch.bfloat16,
                                self.num_gpus, strategy, True, both=False)
        return own

    def estimate(self) -> tuple[int, int, int]:
        """(low, expected, high) bytes per GPU."""
        self.breakdown = self._ledger()
        total = self.breakdown["total"]
        results = (int(total["low"]), int(total["expected"]), int(total["high"]))
        if self.verbose > 1:
            self._print_breakdown(results)
        if self.verbose > 0:
            self._print_verdict(results)
        return results

    def _print_breakdown(self, results) -> None:
        b = self.breakdown
        print(f"Estimations for {self.model_path} ({self.algorithm}, {self.num_gpus} GPU(s), {self.tokens_per_gpu} "
              f"tokens per GPU per micro-batch; bf16 autocast, activation checkpointing"
              f"{', FSDP2' if self.num_gpus > 1 else ''}):")
        for key in ("parameters", "gradients", "optimizer", "activations"):
            print(f"  {key:<12} {_bytes(b[key])} per GPU")
        print(f"  total        {_bytes(results[1])} per GPU (bounds {_bytes(results[0])} - {_bytes(results[2])}); "
              f"{_bytes(results[1] * self.num_gpus)} over {self.num_gpus} GPU(s)")

    def _print_verdict(self, results) -> None:
        low, expected, high = results
        if high <= self.gpu_memory:
            print("The proposed training setup should work for your hardware.")
        elif expected <= self.gpu_memory:
            print(f"The proposed training setup will likely work; the upper bound needs "
                  f"{_bytes(high - self.gpu_memory)} more per GPU.")
        elif low <= self.gpu_memory:
            print(f"The proposed training setup may work but is not recommended: the expected use needs "
                  f"{_bytes(expected - self.gpu_memory)} more per GPU.")
        else:
            print(f"The proposed training setup does not fit: it needs at least {_bytes(low - self.gpu_memory)} more "
                  "per GPU (lower max_tokens_per_gpu, more GPUs, or LoRA).")


class OSFTEstimator(BasicEstimator):
    """Upstream's OSFT estimator: the model with its targets split into OSFT factors (``unfreeze_rank_ratio``)."""

    algorithm = "osft"

    def __init__(self, num_gpus: int = 8, gpu_memory: int = 85899345920,
                 model_path: str = "ibm-granite/granite-3.3-8b-instruct", batch_size: int | None = None,
                 max_seq_len: int | None = None, max_tokens_per_gpu: int | None = None, use_liger: bool = True,
                 verbose: int = 1, trust_remote_code: bool = False, unfreeze_rank_ratio: float = 0.25):
        if not 0.0 <= unfreeze_rank_ratio <= 1.0:
            raise ValueError("Ratio must be in the range [0, 1]")
        super().__init__(num_gpus, gpu_memory, model_path, batch_size, max_seq_len, max_tokens_per_gpu, use_liger,
                         verbose, trust_remote_code, unfreeze_rank_ratio=max(unfreeze_rank_ratio, 1e-6))
        self.unfreeze_rank_ratio = unfreeze_rank_ratio


class OSFTEstimatorExperimental(OSFTEstimator):
    """Upstream's deprecated name for :class:`OSFTEstimator`."""

    def __init__(self, *args: Any, **kwargs: Any):
        import warnings

        warnings.warn("OSFTEstimatorExperimental is OSFTEstimator; use that instead (estimate(training_method="
                      "'osft'))", DeprecationWarning, stacklevel=2)
        super().__init__(*args, **kwargs)


class LoRAEstimator(BasicEstimator):
    """Upstream's LoRA estimator: a frozen base with rank-``lora_r`` adapters on every linear projection. As
    upstream, the tokens per GPU are ``batch_size * max_seq_len / num_gpus`` (both required)."""

    algorithm = "lora_sft"

    def __init__(self, num_gpus: int = 8, gpu_memory: int = 85899345920,
                 model_path: str = "ibm-granite/granite-3.3-8b-instruct", batch_size: int | None = None,
                 max_seq_len: int | None = None, use_liger: bool = False, verbose: int = 1,
                 trust_remote_code: bool = False, lora_r: int = 32):
        if batch_size is None or max_seq_len is None:
            raise ValueError("batch_size and max_seq_len must be provided")
        super().__init__(num_gpus, gpu_memory, model_path, batch_size, max_seq_len, None, use_liger, verbose,
                         trust_remote_code, lora_r=lora_r)
        self.lora_r = lora_r


class QLoRAEstimator(LoRAEstimator):
    """Upstream's QLoRA estimator: as LoRA, with the frozen base stored in 4 bits (the trl backend's QLoRA)."""

    def _ledger(self) -> dict:
        from training_hub.engine.plan import with_bounds

        own = super()._ledger()
        adapters = own["gradients"]  # fp32 adapters: their gradient is their size
        base = own["parameters"] - adapters
        ledger = {**{k: own[k] for k in ("gradients", "optimizer", "activations")},
                  "parameters": math.ceil(base / 8) + adapters}  # fp32 (4 bytes) -> NF4 (half a byte)
        return with_bounds(ledger, own["total"]["high"] - own["total"]["expected"])


def estimate(training_method: str = "sft", num_gpus: int = 8, gpu_memory: int = 85899345920,
             model_path: str = "ibm-granite/granite-3.3-8b-instruct", batch_size: int | None = None,
             max_seq_len: int | None = None, max_tokens_per_gpu: int | None = None, use_liger: bool | None = None,
             verbose: int = 1, trust_remote_code: bool = False, unfreeze_rank_ratio: float = 0.25,
             lora_r: int = 32) -> tuple[int, int, int]:
    """Upstream's convenience function: ``(low, expected, high)`` bytes per GPU for ``training_method`` "sft",
    "osft" (or "osft-e"), "lora" or "qlora", from the engine's planner (see the module doc)."""
    method = str(training_method).lower()
    common = dict(num_gpus=num_gpus, gpu_memory=gpu_memory, model_path=model_path, batch_size=batch_size,
                  max_seq_len=max_seq_len, verbose=verbose, trust_remote_code=trust_remote_code)
    if method in ("osft", "osft-e"):
        cls = OSFTEstimatorExperimental if method == "osft-e" else OSFTEstimator
        estimator = cls(**common, max_tokens_per_gpu=max_tokens_per_gpu, use_liger=True if use_liger is None
                        else use_liger, unfreeze_rank_ratio=unfreeze_rank_ratio)
    elif method in ("lora", "qlora"):
        cls = QLoRAEstimator if method == "qlora" else LoRAEstimator
        estimator = cls(**common, use_liger=bool(use_liger), lora_r=lora_r)
    else:
        estimator = BasicEstimator(**common, max_tokens_per_gpu=max_tokens_per_gpu, use_liger=bool(use_liger))
    return estimator.estimate()


def time_estimate(method: str, model_path: str, num_gpus: int = 2, dataset_dir: str = "table_ds.jsonl",
                  batch_size: int = 128, max_seq_len: int = 8192, max_tokens_per_gpu: int = 10000, lr: float = 1e-5,
                  unfreeze_rank_ratio: float = 0.2, sample_frac: float = 0.05, ckpt_dir: str = "timing_temp_ckpts",
                  use_processed_dataset: bool = False, unmask_messages: bool = False, num_epochs: int = 1,
                  clean_up_artifacts: bool = True, verbose: int = 1) -> tuple[timedelta, timedelta]:
    """Upstream's time estimate, ``(low, high)`` as ``timedelta``s: the planner times a few of the run's own steps
    on this machine (``sample_frac``, ``ckpt_dir`` and ``clean_up_artifacts`` are accepted and unused: nothing is
    trained to completion and nothing is written). ``method``: "sft", "osft" or "lora"."""
    name = _algorithm(method)
    params = dict(model_path=model_path, data_path=dataset_dir, ckpt_output_dir=ckpt_dir, num_epochs=num_epochs,
                  effective_batch_size=batch_size, learning_rate=lr, max_seq_len=max_seq_len,
                  max_tokens_per_gpu=max_tokens_per_gpu, nproc_per_node=num_gpus, unmask_messages=unmask_messages)
    if name == "osft":
        params["unfreeze_rank_ratio"] = unfreeze_rank_ratio
    result = plan(name, **params)
    low, high = result.time_seconds["low"], result.time_seconds["high"]
    if verbose > 0:
        print(f"Estimated training time for {num_epochs} epoch(s): {timedelta(seconds=round(low))} - "
              f"{timedelta(seconds=round(high))} ({result.time_method})")
    return timedelta(seconds=low), timedelta(seconds=high)
