"""Host memory of an FSDP2 training-state save on each rank: gathered to rank 0 (the one-process format, the
fallback ``distributed.full_training_state``) against sharded (``engine.sharded``, every rank writes its own part).

A random Qwen2 of ~58M parameters (no download) is made FSDP2 on CPU (gloo), takes one AdamW step, then saves its
training state the way ``mode`` says while a thread samples the process's resident memory every 0.5 ms. Run it
under torchrun with two processes, once per mode (separate processes, so one mode's freed memory does not hide the
other's)::

    OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --nproc-per-node 2 --standalone \\
        benchmarks/fsdp_state_memory.py gathered
    OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --nproc-per-node 2 --standalone \\
        benchmarks/fsdp_state_memory.py sharded

Each rank prints one line ``FSDP_STATE_MEMORY {...}``: the rise of its resident memory during the save (bytes),
the fp32 model's bytes, and the save's seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path


class PeakResident:
    """The highest resident memory of this process while the block runs, sampled every 0.5 ms."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self.now()
        self.running = True
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()
        return self

    def now(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self.page

    def watch(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.now())
            time.sleep(0.0005)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()

    @property
    def rise(self) -> int:
        return self.peak - self.base


def main(mode: str) -> None:
    import torch
    import torch.distributed as dist
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from training_hub.engine import checkpoint as ckpt
    from training_hub.engine import distributed, sharded

    dist.init_process_group("gloo")
    ranks = distributed.Ranks(rank=dist.get_rank(), world_size=dist.get_world_size(), strategy="fsdp2")
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model = distributed.wrap_model(model, ranks, torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ids = torch.randint(0, config.vocab_size, (1, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    root = Path(distributed.broadcast(ranks, tempfile.mkdtemp(prefix="fsdp-state-") if ranks.is_main else None))
    progress = {"global_step": 1}
    dist.barrier()
    start = time.perf_counter()
    with PeakResident() as memory:
        if mode == "sharded":
            sharded.save(root, model=model, optimizer=optimizer, scheduler=scheduler, progress=progress, ranks=ranks)
        else:
            model_state, optimizer_state = distributed.full_training_state(model, optimizer, ranks)
            if ranks.is_main:
                ckpt.save_training_state(root, model=model, optimizer=optimizer, scheduler=scheduler,
                                         progress=progress, model_state=model_state, optimizer_state=optimizer_state)
            del model_state, optimizer_state
        dist.barrier()
    record = {"mode": mode, "rank": ranks.rank, "world_size": ranks.world_size, "parameters": params,
              "fp32_model_bytes": 4 * params, "resident_rise_bytes": memory.rise,
              "seconds": round(time.perf_counter() - start, 2)}
    print("FSDP_STATE_MEMORY " + json.dumps(record), flush=True)
    dist.barrier()
    if ranks.is_main:
        shutil.rmtree(root, ignore_errors=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("gathered", "sharded"):
        sys.exit("usage: torchrun --nproc-per-node 2 benchmarks/fsdp_state_memory.py gathered|sharded")
    main(sys.argv[1])
