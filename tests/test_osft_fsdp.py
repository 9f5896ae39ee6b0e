"""OSFT under FSDP2: two CPU ranks (gloo), factors sharded unevenly on dim 0, give the same weights as one process.

The projections are plain tensor ops on DTensors; ``Hᵀ G`` contracts over the sharded dimension and DTensor adds
the all-reduce. This checks that claim end to end, with a dense state dict gathered from the shards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

WORKER = textwrap.dedent('''
    import json, os, torch, torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from training_hub.osft_core import apply_osft, dense_state_dict, project_gradients, project_parameters

    def build():
        torch.manual_seed(0)
        model = nn.Module()
        model.layers = nn.ModuleList([nn.Linear(16, 25), nn.Linear(25, 16)])
        apply_osft(model, unfreeze_rank_ratio=0.5, target_patterns=["layers.0", "layers.1"])
        return model

    def train(model, rank, world):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            x = torch.randn(8, 16, generator=gen)
            x = x[rank * 8 // world:(rank + 1) * 8 // world]  # each rank its share; FSDP averages gradients
            model.layers[1](torch.relu(model.layers[0](x))).pow(2).mean().backward()
            project_gradients(model)
            opt.step()
            opt.zero_grad()
            project_parameters(model)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    single = build()
    train(single, 0, 1)
    model = build()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    local_rows = model.layers[0].U_low.to_local().shape[0]
    train(model, rank, world)
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    dense, reference = dense_state_dict(model, full), dense_state_dict(single)
    initial = dense_state_dict(build())
    result = {"local_rows": local_rows, "sharded": type(model.layers[0].U_low).__name__,
              "max_diff": max((dense[k] - reference[k]).abs().max().item() for k in reference),
              "max_overlap": max((full[f"{n}.{h}"].T @ full[f"{n}.{l}"]).abs().max().item()
                                 for n in ("layers.0", "layers.1")
                                 for h, l in (("U_high", "U_low"), ("V_high", "V_low"))),
              "min_change": min((dense[k] - initial[k]).abs().max().item() for k in initial)}
    if rank == 0:
        print("RESULT " + json.dumps(result))
    dist.destroy_process_group()
''')


@pytest.mark.slow
def test_fsdp2_two_ranks_match_one_process(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", str(script)], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))
    assert result["sharded"] == "DTensor" and result["local_rows"] == 13  # 25 rows: 13 + 12, uneven
    assert result["max_diff"] < 1e-6, result
    assert result["max_overlap"] < 1e-6, result
    assert result["min_change"] > 1e-3, result  # every weight and bias trained
