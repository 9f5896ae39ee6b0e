"""The plan of a run, from the code that runs it: steps, memory per device and time, before any weights load.

* Steps: the data is read and tokenized as the run reads it (``prepare_training_data`` / ``prepare_pairs``), then
  :func:`training_hub.engine.run.total_steps` and :func:`training_hub.engine.batching.config_epoch` plan the epochs:
  the counts equal the run's by construction.
* Memory (the ledger of ``engine.ledger``): the model is built from its config on fake tensors
  (``FakeTensorMode``: shapes, no memory), adapted by the run's own ``TrainingMethod`` (OSFT factors, LoRA adapters)
  and checkpointing switch; parameters, gradients and AdamW state are counted from its tensors, activations by
  running the engine's loss (``loss.token_loss_sum``) on the run's largest micro-batches under the same
  :class:`~training_hub.engine.ledger.SavedTensorMeter` a run measures itself with. One process, DDP and FSDP2 at
  the run's world size, with and without activation checkpointing.
* Time: a short calibration (a few of the run's own first steps, on this machine, in a temporary directory), or
  for a named GPU its peak bf16 FLOP/s at a stated utilisation.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from training_hub.engine.batching import IGNORE_INDEX, Step, config_epoch
from training_hub.engine.ledger import KEYS, SavedTensorMeter, parameter_bytes

logger = logging.getLogger("training_hub.engine")

# Peak dense bf16 tensor FLOP/s (vendor figures, no sparsity), for ``gpu=`` time estimates.
GPU_PEAK_FLOPS = {
    "A10G": 70e12, "L4": 121e12, "A100": 312e12, "L40S": 362e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12,
    "B200": 2250e12, "MI300X": 1307e12,
}
DEFAULT_UTILIZATION = 0.35  # share of peak FLOP/s a packed fine-tuning run sustains (MFU)
CALIBRATION_STEPS = 4  # steps timed at least
CALIBRATION_MAX_STEPS = 24
CALIBRATION_SECONDS = 3.0  # more steps while they take less
TIME_SPREAD = 1.5  # time_seconds low/high: expected / 1.5, expected * 1.5
STRATEGIES = ("single", "ddp", "fsdp2")


@dataclass
class RunData:
    """What the planner reads from the data, as the run reads it."""

    kind: str  # "sft" (sft, osft, lora_sft) or "dpo"
    lengths: list[int]  # tokens per sample (DPO: per pair, both sequences)
    targets: list[int]  # loss-bearing targets per sample
    max_tokens: int  # the micro-batch budget
    row: Callable[[list[int]], dict]  # a micro-batch's packed row (on the CPU)
    validation_tokens: int
    source: Any  # TrainingData or Pairs
    tokenizer: Any
    summary: Any = None


@dataclass
class Plan:
    """The plan of one run (see the module doc); ``to_dict()`` is what ``training-hub plan --json`` prints."""

    algorithm: str
    steps: int
    steps_per_epoch: int
    samples: int
    tokens: int
    micro_batches: int
    packing_efficiency: float
    largest_micro_batch: int
    world_size: int
    strategy: str
    checkpointing: bool
    memory: dict
    memory_table: dict
    time_seconds: dict
    time_method: str
    device: str
    setup_seconds: dict = field(default_factory=dict)  # before the loop: data preparation, model load, reference
    fits: dict | None = None
    levers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        import dataclasses

        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return format_plan(self)


# ------------------------------------------------------------------------------------------------ data and steps

def _sample_targets(labels) -> int:
    return sum(1 for t in list(labels)[1:] if t != IGNORE_INDEX)  # shifted: the first label predicts nothing


def sft_run_data(data: Any, tokenizer: Any) -> RunData:
    """The planner's view of an SFT-style run's ``TrainingData``."""
    from training_hub.engine.trainer import collate

    validation = sum(data.validation["length"]) if data.validation is not None else 0
    return RunData("sft", list(data.train["length"]), [_sample_targets(x) for x in data.train["labels"]],
                   data.max_tokens, lambda micro: collate(data.train, micro, None), validation, data, tokenizer,
                   data.summary)


def dpo_run_data(pairs: Any, tokenizer: Any) -> RunData:
    """The planner's view of a DPO run's ``Pairs`` (a pair's targets: its two completions)."""
    from training_hub.engine.dpo import collate_pairs, pair_tokens

    return RunData("dpo", [pair_tokens(p) for p in pairs.train],
                   [len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs.train], pairs.max_tokens,
                   lambda micro: collate_pairs(pairs.train, micro, None),
                   sum(pair_tokens(p) for p in pairs.validation or []), pairs, tokenizer)


def read_data(config: Any, kind: str, cache_dir: Path, verbose: bool = False) -> RunData:
    """Validate, tokenize and summarise the data exactly as the run will (SFT data through the cache)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code)
    if kind == "dpo":
        from training_hub.engine.dpo import prepare_pairs

        return dpo_run_data(prepare_pairs(config, tokenizer), tokenizer)
    from training_hub.data.training import prepare_training_data

    return sft_run_data(prepare_training_data(config, tokenizer, Path(config.ckpt_output_dir), verbose=verbose,
                                              cache_dir=cache_dir), tokenizer)


def run_steps(config: Any, data: RunData, total: int, num_ranks: int = 1, rank: int = 0) -> list[Step]:
    """The run's optimizer steps in order (``rank``'s share of each), cut at ``total`` as the run cuts them."""
    steps: list[Step] = []
    epoch = 0
    while len(steps) < total and epoch < config.num_epochs:
        steps.extend(config_epoch(config, data.lengths, data.max_tokens, epoch, num_ranks=num_ranks, rank=rank))
        epoch += 1
    return steps[:total]


def largest_micro_batches(config: Any, data: RunData, total: int, world: int) -> tuple[list[list[int]], int, int]:
    """The micro-batches where the activation peak can be (most tokens, most loss targets) over every rank, the
    number of micro-batches of all ranks, and the tokens of the largest micro-batch."""
    best_tokens, best_targets, count = (-1, []), (-1, []), 0
    for rank in range(world):
        steps = run_steps(config, data, total, world, rank)
        micros = [m for s in steps for m in s.micro_batches]
        count += len(micros)
        for m in micros:
            tokens, targets = sum(data.lengths[i] for i in m), sum(data.targets[i] for i in m)
            best_tokens = max(best_tokens, (tokens, m), key=lambda x: x[0])
            best_targets = max(best_targets, (targets, m), key=lambda x: x[0])
    candidates = [best_tokens[1]] + ([best_targets[1]] if best_targets[1] != best_tokens[1] else [])
    return candidates, count, best_tokens[0]


def schedule_counts(config: Any, epochs: list[list[int]], total: int, has_validation: bool) -> tuple[int, int]:
    """(checkpoint saves, validations) the run's schedule makes, from the samples of each planned step, following
    ``engine.run``: ``eval_steps``, ``save_samples``, the end of each full epoch, the final checkpoint."""
    saves = validations = step = samples = 0
    for steps in epochs:
        for n in steps:
            if step >= total:
                break
            before, step, samples = samples, step + 1, samples + n
            validations += bool(config.eval_steps and step % config.eval_steps == 0)
            saves += bool(config.save_samples and samples // config.save_samples > before // config.save_samples)
        else:
            validations += has_validation
            saves += bool(config.checkpoint_at_epoch)
            continue
        break
    return saves + bool(config.save_final_checkpoint), validations


# ------------------------------------------------------------------------------------------------ memory

def method_for(algorithm: str, config: Any):
    """The run's ``TrainingMethod`` (None for DPO, whose loop has none)."""
    from training_hub.engine.method import TrainingMethod

    if algorithm == "osft":
        from training_hub.engine.osft import OSFTMethod
        return OSFTMethod.from_config(config)
    if algorithm == "lora_sft":
        from training_hub.engine.lora import LoRAMethod
        return LoRAMethod.from_config(config)
    return None if algorithm == "dpo" else TrainingMethod()


def fake_model(config: Any, make_method: Callable[[], Any], checkpointing: bool):
    """The run's model from its config on fake tensors (no weights, no memory), prepared as the run prepares it."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoConfig, AutoModelForCausalLM

    from training_hub.engine.attention import NAME, register
    from training_hub.engine.model import enable_checkpointing

    model_config = AutoConfig.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code)
    register()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, warnings_quiet(), modules_stay():
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32, attn_implementation="sdpa",
                                                 trust_remote_code=config.trust_remote_code)
        method = make_method()
        if method is not None:
            method.prepare_model(model)
        model.set_attn_implementation(NAME)  # the run's per-sample attention (no mask tensor)
        if checkpointing:
            enable_checkpointing(model)
        model.train()
    return model, mode


@contextlib.contextmanager
def modules_stay():
    """``nn.Module.to()`` as a no-op while the fake model is built: it cannot swap fake parameters (their mode holds
    weak references to them), and every fake tensor already is where the moves would put it (CPU, fp32, as the
    run's master weights; PEFT moves its adapters to their base layer's device and dtype)."""
    original = torch.nn.Module.to
    torch.nn.Module.to = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.nn.Module.to = original


@contextlib.contextmanager
def warnings_quiet():
    import warnings

    level = logging.getLogger("training_hub").level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("training_hub").setLevel(logging.WARNING)
        try:
            yield
        finally:
            logging.getLogger("training_hub").setLevel(level)


def traced_activations(model, mode, rows: list[dict], compute: torch.dtype | None) -> int:
    """Peak saved-activation bytes of the engine's loss over ``rows``, counted as a run counts them."""
    from training_hub.engine.loss import token_loss_sum

    peak = 0
    for row in rows:
        meter = SavedTensorMeter(model)
        fake = {k: mode.from_tensor(v) if torch.is_tensor(v) else v for k, v in row.items()}
        autocast = torch.autocast("cpu", dtype=compute) if compute is not None else contextlib.nullcontext()
        with mode, meter.watch(), autocast:
            token_loss_sum(model, fake)
        peak = max(peak, meter.peak)
    return peak


def state_bytes(model, moments_dtype: str = "float32") -> dict:
    """Parameters, gradients and AdamW state (two moments, in the parameters' dtype or bf16, and a step counter per
    trainable tensor)."""
    trainable = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    grads = sum(p.numel() * p.element_size() for p in trainable)
    moments = 2 * (grads if moments_dtype == "float32" else sum(p.numel() * 2 for p in trainable))
    return {"parameters": parameter_bytes(model), "gradients": grads, "optimizer": moments + 4 * len(trainable)}


def per_device(states: dict, activations: int, strategy: str, world: int) -> dict:
    """The ledger of one device: FSDP2 shards parameters, gradients and optimizer state over the ranks; DDP keeps
    full copies (its gradient buckets, another gradient-sized buffer, are in the ``high`` bound)."""
    share = world if strategy == "fsdp2" else 1
    out = {k: math.ceil(states[k] / share) for k in ("parameters", "gradients", "optimizer")}
    out["activations"] = activations
    return out


def ddp_buckets(ledger: dict, strategy: str, world: int) -> int:
    return ledger["gradients"] if strategy == "ddp" and world > 1 else 0


def with_bounds(ledger: dict, transient: int) -> dict:
    """``total``: low (activations 15% lower), expected (the ledger's sum), high (+ the loss's transient buffers
    and one recomputed layer, and 5% for the allocator)."""
    expected = sum(ledger[k] for k in KEYS)
    low = expected - int(0.15 * ledger["activations"])
    return {**ledger, "total": {"low": low, "expected": expected, "high": int(1.05 * (expected + transient))}}


def loss_buffer(model, rows: list[dict]) -> int:
    """Bytes of the loss positions' logits of the largest row, in fp32 (chunked as ``loss.CHUNK_ELEMENTS`` says)."""
    from training_hub.engine.loss import CHUNK_ELEMENTS

    head = model.get_output_embeddings()
    vocab = getattr(head, "out_features", None) or model.config.get_text_config().vocab_size
    targets = max(int(row["num_targets"]) for row in rows)
    return 4 * min(targets * vocab, max(CHUNK_ELEMENTS, vocab) if isinstance(head, torch.nn.Linear) else targets * vocab)


def predict_memory(config: Any, make_method: Callable[[], Any], rows: list[dict], compute, world: int,
                   strategy: str, checkpointing: bool, both: bool = True) -> tuple[dict, dict]:
    """(the run's own per-device ledger with bounds, {checkpointing on/off: {strategy: total bounds}}); ``both``:
    also the other checkpointing setting (else the table has only the run's own)."""
    table: dict = {}
    own = None
    one_layer = 0
    for ckpt in (False, True) if both else (checkpointing,):
        model, mode = fake_model(config, make_method, ckpt)
        states = state_bytes(model, getattr(config, "optimizer_state_dtype", "float32"))
        activations = traced_activations(model, mode, rows, compute)
        logits = loss_buffer(model, rows)
        layers = max(1, getattr(model.config.get_text_config(), "num_hidden_layers", 1))
        if not ckpt:  # one layer's share: what checkpointing recomputes at once in the backward pass
            one_layer = activations // layers
        transient = 2 * logits + (one_layer if ckpt else 0)
        key = "with_checkpointing" if ckpt else "without_checkpointing"
        ledgers = {s: per_device(states, activations, s, world) for s in STRATEGIES if s == "single" or world > 1}
        table[key] = {s: with_bounds(ledger, transient + ddp_buckets(ledger, s, world))["total"]
                      for s, ledger in ledgers.items()}
        if ckpt == checkpointing:
            ledger = per_device(states, activations, strategy, world)
            own = {**with_bounds(ledger, transient + ddp_buckets(ledger, strategy, world)), "logits": logits}
        del model
    return own, table


# ------------------------------------------------------------------------------------------------ time

def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def calibration_recipe(config: Any, algorithm: str, data: RunData, steps: list[Step], total: int, root: Path,
                       setup: dict):
    """The run's recipe on this machine (real weights), writing into ``root``, and the steps to time with it (DPO:
    its reference pass over just those steps' pairs, and the steps renumbered to them). ``setup`` receives the
    seconds of loading the model and (DPO) of the reference pass, scaled to every pair."""
    from training_hub.engine import distributed
    from training_hub.engine.model import device_and_autocast, load_model
    from training_hub.engine.run import optimizer_and_scheduler, seed_everything

    device, autocast, _ = device_and_autocast(config)
    seed_everything(config.seed)
    t0 = time.perf_counter()
    with warnings_quiet():
        raw, save_dtype = load_model(config, device)
        method = method_for(algorithm, config)
        if method is not None:
            method.prepare_model(raw)
    setup["model load"] = time.perf_counter() - t0
    trainable = [p for p in raw.parameters() if p.requires_grad]
    optimizer, scheduler = optimizer_and_scheduler(config, trainable, total)
    parts = dict(device=device, autocast=autocast, tokenizer=data.tokenizer, model=raw, save_dtype=save_dtype,
                 optimizer=optimizer, scheduler=scheduler, root=root)
    if data.kind != "dpo":
        from training_hub.engine.trainer import SFTRecipe

        return SFTRecipe(config, method=method, ranks=distributed.SINGLE, data=data.source, raw=raw,
                         trainable=trainable, **parts), steps
    from training_hub.engine.dpo import DPORecipe, Pairs

    chosen = sorted({i for s in steps for m in s.micro_batches for i in m})
    index = {i: k for k, i in enumerate(chosen)}
    pairs = Pairs([data.source.train[i] for i in chosen], None, data.max_tokens, 0)
    renumbered = [Step([[index[i] for i in m] for m in s.micro_batches], s.num_samples, s.num_tokens)
                  for s in steps]
    t0 = time.perf_counter()
    recipe = DPORecipe(config, data=pairs, **parts)  # its reference pass over these pairs
    share = sum(data.lengths[i] for i in chosen) / max(1, sum(data.lengths) + data.validation_tokens)
    setup["reference pass"] = (time.perf_counter() - t0) / max(share, 1e-9)
    return recipe, renumbered


def calibrated_seconds(config: Any, algorithm: str, data: RunData, steps: list[Step], saves: int,
                       validations: int, setup: dict) -> tuple[float, str]:
    """Seconds of the run's training loop (what its ``elapsed_seconds`` counts), from timing its first steps here
    (at least ``CALIBRATION_STEPS``, more while they take under ``CALIBRATION_SECONDS``): the first step as measured,
    the others at the rate per token of the next ones (the slowest left out: one step slowed by another process
    does not set the figure), plus its saves and validations."""
    from training_hub.engine.run import Progress

    sample = steps[:CALIBRATION_MAX_STEPS]
    with tempfile.TemporaryDirectory(prefix="training_hub_plan_") as tmp:
        recipe, timed = calibration_recipe(config, algorithm, data, sample, len(steps), Path(tmp), setup)
        seconds: list[float] = []
        for step in timed:
            if len(seconds) >= CALIBRATION_STEPS and sum(seconds) > CALIBRATION_SECONDS:
                break
            seconds.append(_timed(lambda: recipe.train_step(step, lambda: False)))
        save = min(_timed(lambda: (recipe.save_checkpoint(sample[0].num_samples),
                                   recipe.save_state(Progress().state(0.0)))) for _ in range(2)) if saves else 0.0
    later = list(zip(seconds, sample))[1:] or list(zip(seconds, sample))
    if len(later) >= 3:
        later.remove(max(later, key=lambda pair: pair[0] / max(1, pair[1].num_tokens)))
    per_token = sum(t for t, _ in later) / max(1, sum(s.num_tokens for _, s in later))
    train = seconds[0] + per_token * sum(s.num_tokens for s in steps[1:])
    validate = validations * data.validation_tokens * per_token / 3  # a forward is about a third of a step
    how = (f"calibrated: {len(seconds)} step(s) of this run timed here ({per_token * 1e6:.1f} us/token after the "
           f"first step's {seconds[0]:.2f}s), {saves} save(s) at {save:.2f}s, {validations} validation(s)")
    return train + saves * save + validate, how


def flops_seconds(config: Any, algorithm: str, tokens: int, gpu: str, utilization: float, world: int,
                  checkpointing: bool) -> tuple[float, str]:
    """Seconds from the model's matmul FLOPs per token (forward 2 per weight; backward 2 for the inputs' gradient
    and 2 more per trainable weight; recomputation another forward) at ``utilization`` of ``gpu``'s peak."""
    key = gpu.upper().replace("NVIDIA", "").strip().split()[0] if gpu.strip() else gpu
    if key not in GPU_PEAK_FLOPS:
        raise ValueError(f"gpu={gpu!r}: no peak FLOP/s known for it; known: {', '.join(GPU_PEAK_FLOPS)}")
    model, _ = fake_model(config, lambda: method_for(algorithm, config), False)
    dense = trainable = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "OSFTLinear":
            n = module.in_features * module.out_features
            dense += n
            trains = any(p.requires_grad for p in module.parameters(recurse=False))
            trainable += n if trains else 0
    per_token = 2 * dense + 2 * dense + 2 * trainable + (2 * dense if checkpointing else 0)
    seconds = per_token * tokens / (GPU_PEAK_FLOPS[key] * utilization * world)
    return seconds, (f"{gpu}: {per_token / 1e9:.2f} GFLOP/token at {utilization:.0%} of "
                     f"{GPU_PEAK_FLOPS[key] / 1e12:.0f} TFLOP/s x {world} device(s)")


# ------------------------------------------------------------------------------------------------ the plan

def run_setting(config: Any, gpu: str | None) -> tuple[int, str, bool, torch.dtype | None, str]:
    """(world size, strategy, checkpointing, compute dtype, device) the run will have; ``gpu``: as on that GPU."""
    from training_hub.config.processes import launch_plan
    from training_hub.engine.distributed import resolve_strategy
    from training_hub.engine.model import checkpointing, compute_dtype

    cuda = gpu is not None or torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    world = launch_plan(config).world_size
    strategy = resolve_strategy(config.strategy, cuda) if world > 1 else "single"
    return (world, strategy, checkpointing(config.gradient_checkpointing, device), compute_dtype(config, device),
            gpu or (torch.cuda.get_device_name() if cuda else "cpu"))


def plan_run(config: Any, algorithm: str, *, calibrate: bool = True, gpu: str | None = None,
             utilization: float | None = None, gpu_memory: int | None = None) -> Plan:
    """Plan ``config``'s run of ``algorithm`` (sft, osft, lora_sft, dpo) without writing into its output directory:
    the data is read (through ``data_output_dir``'s cache when set, else a temporary one)."""
    from training_hub.engine.run import total_steps

    world, strategy, ckpt, compute, device = run_setting(config, gpu)
    with tempfile.TemporaryDirectory(prefix="training_hub_plan_data_") as tmp:
        cache = Path(config.data_output_dir) if config.data_output_dir else Path(tmp)
        t0 = time.perf_counter()
        data = read_data(config, "dpo" if algorithm == "dpo" else "sft", cache)
        setup = {"data": time.perf_counter() - t0}
        steps_per_epoch, total = total_steps(config, len(data.lengths))
        steps = run_steps(config, data, total)
        candidates, micro_count, largest = largest_micro_batches(config, data, total, world)
        memory, table = predict_memory(config, lambda: method_for(algorithm, config),
                                       [data.row(m) for m in candidates], compute, world, strategy, ckpt)
        tokens = sum(s.num_tokens for s in steps)
        seconds, how = plan_time(config, algorithm, data, steps, memory, setup, calibrate=calibrate, gpu=gpu,
                                 utilization=utilization, world=world, checkpointing=ckpt)
    plan = Plan(algorithm=algorithm, steps=total, steps_per_epoch=steps_per_epoch,
                samples=sum(s.num_samples for s in steps), tokens=tokens, micro_batches=micro_count,
                packing_efficiency=round(tokens / max(1, micro_count * data.max_tokens), 4),
                largest_micro_batch=largest, world_size=world, strategy=strategy, checkpointing=ckpt, memory=memory,
                memory_table=table, time_seconds=time_bounds(seconds), time_method=how, device=device,
                setup_seconds={k: round(v, 3) for k, v in setup.items()})
    capacity = gpu_memory or (torch.cuda.mem_get_info()[0] if gpu is None and torch.cuda.is_available() else None)
    if capacity:
        plan.fits = {"capacity": int(capacity), "fits": memory["total"]["expected"] <= capacity}
        if not plan.fits["fits"]:
            plan.levers = levers(config, algorithm, memory, table, int(capacity), world, data, ckpt)
    return plan


def available_memory() -> int | None:
    """Free memory of the device a calibration would run on: CUDA's, else Linux's MemAvailable (None: unknown)."""
    if torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def plan_time(config: Any, algorithm: str, data: RunData, steps: list[Step], memory: dict, setup: dict, *,
              calibrate: bool, gpu: str | None, utilization: float | None, world: int,
              checkpointing: bool) -> tuple[float | None, str]:
    """Seconds of the training loop and how they were found; ``setup`` gains the model load (and DPO's reference
    pass) when calibrating. Not calibrated where the run would not fit this machine's free memory."""
    if gpu is not None:
        return flops_seconds(config, algorithm, sum(s.num_tokens for s in steps), gpu,
                             utilization or DEFAULT_UTILIZATION, world, checkpointing)
    if not calibrate:
        return None, "not estimated (calibrate=False and no gpu)"
    free = available_memory()
    if free is not None and memory["total"]["high"] > free:
        return None, (f"not calibrated: the run needs up to {_gib(memory['total']['high'])} and this machine has "
                      f"{_gib(free)} free; name a gpu for an estimate from its FLOP/s")
    per_epoch = math.ceil(len(data.lengths) / config.effective_batch_size)  # as run.total_steps counts
    epochs = [[s.num_samples for s in config_epoch(config, data.lengths, data.max_tokens, e)]
              for e in range(min(config.num_epochs, math.ceil(len(steps) / per_epoch)))]
    saves, validations = schedule_counts(config, epochs, len(steps), data.validation_tokens > 0)
    rank_steps = run_steps(config, data, len(steps), world, 0) if world > 1 else steps
    seconds, how = calibrated_seconds(config, algorithm, data, rank_steps, saves, validations, setup)
    if world > 1:
        how += f"; one process timed rank 0's share, without the {world} ranks' communication"
    return seconds, how


def time_bounds(seconds: float | None) -> dict:
    if seconds is None:
        return {"low": None, "expected": None, "high": None}
    return {"low": seconds / TIME_SPREAD, "expected": seconds, "high": seconds * TIME_SPREAD}


def levers(config: Any, algorithm: str, memory: dict, table: dict, capacity: int, world: int, data: RunData,
           ckpt: bool) -> list[str]:
    """Changes that would make a run that does not fit ``capacity`` bytes per device fit, each with its figure."""
    gib = 2 ** 30
    fixed = memory["total"]["expected"] - memory["activations"]
    out = []
    if memory["activations"] and fixed < 0.9 * capacity:
        budget = int(data.max_tokens * (0.9 * capacity - fixed) / memory["activations"])
        if budget >= max(data.lengths):
            out.append(f"max_tokens_per_gpu={budget} (activations scale with the micro-batch's tokens; now "
                       f"{data.max_tokens})")
    other = table.get("with_checkpointing", {}).get("single" if world == 1 else "fsdp2")
    if not ckpt and other and other["expected"] <= capacity:
        out.append(f"gradient_checkpointing=True ({other['expected'] / gib:.1f} GiB per device)")
    states = sum(memory[k] for k in ("parameters", "gradients", "optimizer")) * (world if world > 1 else 1)
    room = 0.9 * capacity - memory["activations"]
    if room > 0:
        n = max(2, math.ceil(states / room))
        out.append(f"nproc_per_node={n} with strategy='fsdp2' (parameters, gradients and optimizer state sharded "
                   f"over {n} GPUs)")
    if algorithm == "sft":
        frozen = memory["parameters"] * (world if world > 1 else 1) + memory["activations"]
        if frozen <= capacity:
            out.append(f"lora_sft instead of sft (a frozen base: about {frozen / gib:.1f} GiB per device)")
    return out


def algorithm_of(method: Any) -> str:
    """The algorithm a ``TrainingMethod`` trains (None: DPO's loop)."""
    name = type(method).__name__
    return {"OSFTMethod": "osft", "LoRAMethod": "lora_sft", "NoneType": "dpo"}.get(name, "sft")


def check_fits(config: Any, method: Any, make_data: Callable[[], RunData], device: torch.device,
               free: int | None = None) -> None:
    """Before the model loads, on CUDA: stop a run whose plan cannot fit the device's free memory (or ``free``
    bytes), naming the levers that would make it fit (no-op on CPU). ``method``: the run's ``TrainingMethod``, not
    yet applied."""
    if device.type != "cuda" and free is None:
        return
    import copy

    from training_hub.engine.run import total_steps

    algorithm, data = algorithm_of(method), make_data()
    make_method = lambda: copy.deepcopy(method)  # noqa: E731

    world, strategy, ckpt, compute, _ = run_setting(config, None)
    _, total = total_steps(config, len(data.lengths))
    candidates, _, largest = largest_micro_batches(config, data, total, world)
    rows = [data.row(m) for m in candidates]
    try:
        memory, table = predict_memory(config, make_method, rows, compute, world, strategy, ckpt, both=False)
        free = torch.cuda.mem_get_info(device)[0] if free is None else free
        if memory["total"]["low"] <= free:
            return
        if not ckpt:  # the checkpointing lever needs the other setting's figures
            memory, table = predict_memory(config, make_method, rows, compute, world, strategy, ckpt)
    except Exception as exc:  # a model the fake-tensor trace cannot run: the check advises, it never blocks
        logger.warning("memory check skipped: the plan of this model failed (%s: %s)", type(exc).__name__, exc)
        return
    ways = levers(config, algorithm, memory, table, free, world, data, ckpt)
    raise MemoryError(
        f"this run needs at least {_gib(memory['total']['low'])} per device (parameters {_gib(memory['parameters'])}, "
        f"gradients {_gib(memory['gradients'])}, optimizer {_gib(memory['optimizer'])}, activations "
        f"{_gib(memory['activations'])} at its largest micro-batch of {largest} tokens), but {device} has "
        f"{_gib(free)} free. To make it fit: " + ("; ".join(ways) if ways else "a GPU with more memory")
        + ". (training-hub plan ... shows the whole ledger.)")


# ------------------------------------------------------------------------------------------------ the table

def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2 ** 30:.3f} GiB" if n >= 2 ** 27 else f"{n / 2 ** 20:.2f} MiB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    hours, rest = divmod(int(round(seconds)), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if seconds >= 60 else f"{seconds:.1f}s"


def format_plan(plan: Plan) -> str:
    """The plan as a readable table (``training-hub plan`` without ``--json``)."""
    m, t = plan.memory, plan.time_seconds
    lines = [f"Plan: {plan.algorithm} on {plan.device}, {plan.world_size} process(es), strategy {plan.strategy}, "
             f"activation checkpointing {'on' if plan.checkpointing else 'off'}",
             f"  optimizer steps   {plan.steps} ({plan.steps_per_epoch} per epoch)",
             f"  samples / tokens  {plan.samples} / {plan.tokens}",
             f"  micro-batches     {plan.micro_batches}, largest {plan.largest_micro_batch} tokens, packing "
             f"efficiency {plan.packing_efficiency:.0%}",
             "", "Memory per device (the run's own setting):"]
    for key in ("parameters", "gradients", "optimizer", "activations"):
        lines.append(f"  {key:<18}{_gib(m[key])}")
    lines.append(f"  {'(loss logits)':<18}{_gib(m.get('logits'))}  (inside activations)")
    lines.append(f"  {'total':<18}{_gib(m['total']['expected'])}  (low {_gib(m['total']['low'])}, high "
                 f"{_gib(m['total']['high'])})")
    lines += ["", "Memory per device, expected (low-high):"]
    for setting, row in plan.memory_table.items():
        cells = ", ".join(f"{s} {_gib(b['expected'])} ({_gib(b['low'])}-{_gib(b['high'])})" for s, b in row.items())
        lines.append(f"  {setting.replace('_', ' '):<26}{cells}")
    lines += ["", f"Time (training loop): {_duration(t['expected'])} (low {_duration(t['low'])}, high "
                  f"{_duration(t['high'])})", f"  {plan.time_method}"]
    if plan.setup_seconds:
        lines.append("  before it: " + ", ".join(f"{k} {_duration(v)}" for k, v in plan.setup_seconds.items()))
    if plan.fits is not None:
        verdict = "fits" if plan.fits["fits"] else "does NOT fit"
        lines += ["", f"Device memory {_gib(plan.fits['capacity'])}: the run {verdict}."]
        lines += [f"  - {lever}" for lever in plan.levers]
    lines += [f"Note: {note}" for note in plan.notes]
    return "\n".join(lines)
