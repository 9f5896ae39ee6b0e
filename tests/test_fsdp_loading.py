"""FSDP2 loading (engine.loading): rank 0 reads the weights, the other ranks build the model on the meta device and
receive their shards; the result is the model every rank used to load in full, for SFT, OSFT and LoRA.

The fast tests check the meta-device structure in one process (OSFT's structure-only decomposition, the meta
model). The slow one runs two gloo ranks under torchrun and compares, method by method, the meta-loaded FSDP2
model with the old path (every rank ``from_pretrained`` + the method + ``fully_shard``): the same gathered weights,
buffers, attention and trainable parameters at the start and after two AdamW steps; and it records what rank 1
read and held before sharding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

OSFT = dict(unfreeze_rank_ratio=0.5, target_patterns=None, freeze_non_targets=False)


def meta_copy(model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)


def test_osft_on_a_meta_model_has_the_structure_of_the_decomposed_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from training_hub.osft_core import OSFTLinear, apply_osft

    real = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    meta = meta_copy(tiny_model_dir)
    kw = dict(unfreeze_rank_ratio=0.3, target_patterns=["q_proj", "mlp.down_proj"], freeze_non_targets=True)
    summaries = apply_osft(real, **kw), apply_osft(meta, **kw)
    assert summaries[0] == summaries[1] and summaries[0]["targets"]
    shapes = [{n: (tuple(p.shape), p.dtype, p.requires_grad) for n, p in m.named_parameters()} for m in (real, meta)]
    assert shapes[0] == shapes[1]
    assert all(p.is_meta for p in meta.parameters()) and not any(p.is_meta for p in real.parameters())
    layer = meta.get_submodule(summaries[1]["targets"][0])
    assert isinstance(layer, OSFTLinear) and layer.weight_dtype == torch.float32
    with pytest.raises(ValueError, match="materialised 2-D weight"):
        OSFTLinear.from_linear(torch.nn.Linear(4, 3, device="meta"), 1)


def test_the_meta_model_matches_the_loaded_model_and_reads_no_weights(tiny_model_dir, monkeypatch):
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from training_hub.engine.loading import meta_model
    from training_hub.engine.model import load_model

    config = SimpleNamespace(model_path=str(tiny_model_dir), trust_remote_code=False, gradient_checkpointing=True,
                             dtype="float32")
    loaded, _ = load_model(config, torch.device("cpu"))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights read"))
    meta = meta_model(config, torch.device("cpu"))
    assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    assert {n: tuple(t.shape) for n, t in meta.state_dict().items()} == \
        {n: tuple(t.shape) for n, t in loaded.state_dict().items()}
    assert [n for n, _ in meta.named_buffers()] == [n for n, _ in loaded.named_buffers()]
    assert meta.lm_head.weight is meta.model.embed_tokens.weight  # tied, as loaded
    checkpointed = [m.is_activation_checkpointing if hasattr(m, "is_activation_checkpointing")
                    else m.is_gradient_checkpointing for m in (meta, loaded)]  # renamed in transformers 5
    assert meta.training and checkpointed == [True, True]
    assert meta.config._attn_implementation == "sdpa"  # rank 0's self-check result arrives by broadcast


WORKER = textwrap.dedent('''
    import json, sys, torch
    from pathlib import Path
    from types import SimpleNamespace
    import transformers
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from training_hub.engine import distributed, loading
    from training_hub.engine.lora import LoRAMethod
    from training_hub.engine.method import TrainingMethod
    from training_hub.engine.osft import OSFTMethod

    MODEL = sys.argv[1]
    OSFT = json.loads(sys.argv[2])
    ranks = distributed.setup("fsdp2")
    config = SimpleNamespace(model_path=MODEL, trust_remote_code=False, gradient_checkpointing=True, dtype="float32")
    cpu = torch.device("cpu")
    reads, held = [], []  # from_pretrained calls; parameter bytes held when sharding starts
    real_from_pretrained = transformers.AutoModelForCausalLM.from_pretrained.__func__
    transformers.AutoModelForCausalLM.from_pretrained = classmethod(
        lambda cls, *a, **k: reads.append(1) or real_from_pretrained(cls, *a, **k))
    real_wrap = distributed.wrap_model

    def wrap_and_record(model, *args, **kwargs):
        held.append(sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta))
        return real_wrap(model, *args, **kwargs)

    distributed.wrap_model = wrap_and_record

    def method(name):
        if name == "sft":
            return TrainingMethod()
        if name == "osft":
            return OSFTMethod(**OSFT)
        return LoRAMethod(model_path=MODEL, r=4, alpha=8, dropout=0.0, target_modules=None,
                          use_dora=name == "dora", seed=5)

    def old_path(name, offload):  # what train_sft_rank did before: every rank loads the whole model
        raw, _ = loading.load_model(config, cpu)
        m = method(name)
        m.prepare_model(raw)
        return raw, distributed.wrap_model(raw, ranks, cpu, cpu_offload=offload), m

    def new_path(name, offload):
        m = method(name)
        raw, model, _ = loading.build_model(config, m, ranks, cpu, cpu_offload=offload)
        return raw, model, m

    def train(raw, model, m):  # two AdamW steps, each rank its own half of the batch
        params = [p for p in raw.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        gen = torch.Generator().manual_seed(3)
        for _ in range(2):
            ids = torch.randint(5, 200, (2, 9), generator=gen)[ranks.rank:ranks.rank + 1]
            model(input_ids=ids, labels=ids).loss.backward()
            m.before_step(raw)
            opt.step()
            m.after_step(raw)
            opt.zero_grad()

    def snapshot(raw, model):
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        return ({k: v.clone() for k, v in full.items()}, {n: b.clone() for n, b in raw.named_buffers()})

    def max_diff(a, b):
        assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
        return max((a[k].float() - b[k].float()).abs().max().item() for k in a)

    report = {}
    for name, offload in [("sft", False), ("osft", False), ("lora", False), ("dora", False), ("sft", True)]:
        key = name + (" offload" if offload else "")
        before = len(reads), len(held)
        new_raw, new_model, new_m = new_path(name, offload)
        new_reads, new_held = len(reads) - before[0], held[before[1]]
        new_start = snapshot(new_raw, new_model)
        old_raw, old_model, old_m = old_path(name, offload)
        old_start = snapshot(old_raw, old_model)
        train(new_raw, new_model, new_m)
        train(old_raw, old_model, old_m)
        new_end, old_end = snapshot(new_raw, new_model), snapshot(old_raw, old_model)
        report[key] = dict(
            reads=new_reads, held_bytes=new_held, old_held_bytes=held[-1],
            start=max_diff(new_start[0], old_start[0]), buffers=max_diff(new_start[1], old_start[1]),
            trained=max_diff(new_end[0], old_end[0]), moved=max_diff(new_end[0], new_start[0]),
            attention=[new_raw.config._attn_implementation, old_raw.config._attn_implementation],
            tied=new_raw.lm_head.weight is new_raw.model.embed_tokens.weight,
            trainable=[n for n, p in new_raw.named_parameters() if p.requires_grad] ==
                      [n for n, p in old_raw.named_parameters() if p.requires_grad])
    # one file per rank: two ranks printing to one pipe can interleave their lines
    (Path(sys.argv[3]) / f"REPORT{ranks.rank}").write_text(json.dumps(report))
    distributed.teardown(ranks)
''')


@pytest.mark.slow
def test_fsdp2_meta_loading_gives_every_method_the_model_every_rank_used_to_load(tiny_model_dir, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                           str(script), str(tiny_model_dir), json.dumps(OSFT), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = {path.name: json.loads(path.read_text()) for path in tmp_path.glob("REPORT*")}
    assert set(reports) == {"REPORT0", "REPORT1"}
    full_bytes = reports["REPORT0"]["sft"]["old_held_bytes"]
    assert full_bytes > 0
    for rank, report in ((0, reports["REPORT0"]), (1, reports["REPORT1"])):
        for key, r in report.items():
            print(f"rank {rank} {key}: {r}")
            # only rank 0 reads the checkpoint; rank 1 holds no parameter bytes before sharding (the old path: all)
            assert r["reads"] == (1 if rank == 0 else 0), (rank, key)
            assert (r["held_bytes"] > 0) == (rank == 0) and r["old_held_bytes"] > 0, (rank, key)
            assert r["start"] == 0 and r["buffers"] == 0, (rank, key, r)  # bit-identical weights and rotary tables
            assert r["trained"] < 1e-6 and r["moved"] > 1e-4, (rank, key, r)  # it trains, identically
            assert r["attention"][0] == r["attention"][1] and r["tied"] and r["trainable"], (rank, key, r)
