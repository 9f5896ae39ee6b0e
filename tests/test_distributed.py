"""Several processes through torchrun: same loss curve and weights as one process (DDP, FSDP2, OSFT), resume,
a failing worker, Ctrl-C, and a two-launcher "multi-node" run on localhost.

The fast tests check the pieces in one process: the split of a step across ranks, the loss normalisation
(each rank's gradient scaled as DDP/FSDP2 need it averages to the one-process gradient), the empty micro-batch,
and how launch settings are resolved. The slow ones run real torchrun jobs on CPU (gloo), one thread per worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from test_engine_train import load_weights, write_chat
from training_hub import TrainingHubCallback
from training_hub.engine.batching import pack, pack_into_micro_batches, plan_epoch, split_across_ranks

COMMON = dict(max_seq_len=64, max_tokens_per_gpu=64, effective_batch_size=7, learning_rate=3e-3,
              lr_scheduler="constant", warmup_steps=2, weight_decay=0.01, seed=7, disable_progress_bar=True,
              dtype="float32")
STEPS = 4
TOLERANCE = 1e-4


# ------------------------------------------------------------------------------------------ fast: pieces

def test_a_step_is_split_across_ranks_without_losing_or_repeating_a_sample():
    lengths = [30, 5, 22, 17, 9, 40, 3, 28, 12, 33, 8, 19, 25]
    one = plan_epoch(lengths, effective_batch_size=7, max_tokens_per_gpu=53, seed=1, epoch=0)
    two = [plan_epoch(lengths, effective_batch_size=7, max_tokens_per_gpu=53, seed=1, epoch=0, num_ranks=2, rank=r)
           for r in range(2)]
    padded = False
    for k, step in enumerate(one):
        shares = [sorted(i for micro in plan[k].micro_batches for i in micro) for plan in two]
        assert sorted(shares[0] + shares[1]) == sorted(i for micro in step.micro_batches for i in micro)
        assert all(two[r][k].num_samples == step.num_samples and two[r][k].num_tokens == step.num_tokens
                   for r in range(2))
        counts = [len(plan[k].micro_batches) for plan in two]
        assert two[0][k].max_micro_batches == two[1][k].max_micro_batches == max(counts)
        assert all(sum(lengths[i] for i in micro) <= 53 for plan in two for micro in plan[k].micro_batches)
        padded |= counts[0] != counts[1]
        tokens = [sum(lengths[i] for i in share) for share in shares]
        assert abs(tokens[0] - tokens[1]) <= max(lengths)  # balanced by tokens
    assert padded  # this plan exercises ranks with different micro-batch counts
    assert one[0].max_micro_batches == len(one[0].micro_batches)
    # a step smaller than the number of ranks leaves a rank empty
    assert split_across_ranks([4], lengths, 2) == [[4], []]


def test_rank_gradients_scaled_by_world_size_average_to_the_one_process_gradient(tiny_model_dir):
    """The loss math of engine.distributed, without processes: global token count, grad_scale, averaging."""
    from transformers import AutoModelForCausalLM

    from training_hub.engine.distributed import empty_micro_batch
    from training_hub.engine.loss import step_loss_and_backward

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    samples = [(torch.randint(5, 200, (n,)).tolist(), n) for n in (9, 14, 6, 11, 7)]

    def row(indices):
        ids = [samples[i][0] for i in indices]
        labels = [[-100] * 3 + s[3:] for s in ids]  # a prompt of 3 tokens without loss
        return pack(ids, labels)

    def grads():
        out = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return out

    nothing = contextlib.nullcontext  # no autocast
    one_loss, one_tokens = step_loss_and_backward(model, [row([0, 1]), row([2, 3]), row([4])], nothing)
    reference = grads()
    shares = [[row([0, 1]), row([4])], [row([2, 3]), empty_micro_batch(torch.device("cpu"))]]  # rank 1 padded
    total = sum(int(r["loss_mask"].sum()) for share in shares for r in share)
    assert total == one_tokens
    rank_grads, rank_losses = [], []
    for share in shares:
        loss, _ = step_loss_and_backward(model, share, nothing, total_targets=total, grad_scale=2)
        rank_losses.append(loss)
        rank_grads.append(grads())
    assert sum(rank_losses) == pytest.approx(one_loss, abs=1e-6)
    for name, want in reference.items():
        averaged = (rank_grads[0][name] + rank_grads[1][name]) / 2  # what DDP's all-reduce / FSDP2 compute
        torch.testing.assert_close(averaged, want, atol=1e-7, rtol=1e-5, msg=name)


def test_empty_micro_batch_gives_every_parameter_a_zero_gradient(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from training_hub.engine.distributed import empty_micro_batch
    from training_hub.engine.loss import token_loss_sum

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    loss = token_loss_sum(model, empty_micro_batch(torch.device("cpu")))
    loss.backward()
    assert loss.item() == 0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())  # DDP/FSDP2 hooks all fire


def test_launch_plan_takes_cluster_environment_for_parameters_left_at_defaults():
    from training_hub.algorithms.sft import SFTConfig
    from training_hub.engine.launch import launch_plan, torchrun_args

    base = dict(model_path="m", data_path="d", ckpt_output_dir="o")
    env = {"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_NPROC_PER_NODE": "4", "PET_MASTER_ADDR": "10.0.0.5",
           "PET_MASTER_PORT": "23456"}
    plan = launch_plan(SFTConfig(**base), env)
    assert (plan.nproc_per_node, plan.nnodes, plan.node_rank, plan.world_size) == (4, 2, 1, 8)
    assert torchrun_args(plan) == ["--nproc-per-node", "4", "--nnodes", "2", "--node-rank", "1",
                                   "--master-addr", "10.0.0.5", "--master-port", "23456"]
    explicit = launch_plan(SFTConfig(**base, nproc_per_node=2, master_port=29999), env)
    assert explicit.nproc_per_node == 2 and explicit.master_port == 29999
    assert launch_plan(SFTConfig(**base), {}).world_size == 1
    assert torchrun_args(launch_plan(SFTConfig(**base, nproc_per_node=2), {}))[-1] == "--standalone"
    rdzv = launch_plan(SFTConfig(**base, nnodes=2, node_rank=1, rdzv_endpoint="host:1234", rdzv_id="job"), {})
    assert torchrun_args(rdzv)[-6:] == ["--rdzv-backend", "c10d", "--rdzv-endpoint", "host:1234", "--rdzv-id", "job"]
    auto = launch_plan(SFTConfig(**base, nproc_per_node="auto"), {})
    assert auto.nproc_per_node == max(torch.cuda.device_count(), 1)
    with pytest.raises(ValueError, match="rdzv_endpoint.*master_addr"):
        launch_plan(SFTConfig(**base, nnodes=2), {})
    with pytest.raises(ValueError, match="elastic ranges"):
        launch_plan(SFTConfig(**base), {"PET_NNODES": "1:4"})


# ------------------------------------------------------------------------------------------ slow: runs

def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["type"] == "train"]


def assert_same_run(got: Path, want: Path, label: str) -> None:
    """Per-step losses within TOLERANCE and final weights close; prints the measured differences."""
    got_losses, want_losses = losses(got), losses(want)
    assert len(got_losses) == len(want_losses) == STEPS, (got_losses, want_losses)
    diffs = [abs(a - b) for a, b in zip(got_losses, want_losses)]
    got_w = load_weights(next((Path(got) / "hf_format").iterdir()))
    want_w = load_weights(next((Path(want) / "hf_format").iterdir()))
    assert got_w.keys() == want_w.keys()
    weight_diff = max((got_w[k] - want_w[k]).abs().max().item() for k in want_w)
    print(f"{label}: per-step |loss diff| {['%.1e' % d for d in diffs]}, max |weight diff| {weight_diff:.1e}")
    assert max(diffs) < TOLERANCE, (label, diffs)
    assert weight_diff < TOLERANCE, (label, weight_diff)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_chat(tmp_path_factory.mktemp("dist_data") / "chat.jsonl")


@pytest.fixture(scope="module")
def reference(tiny_model_dir, data, tmp_path_factory):
    """One-process SFT and OSFT runs of STEPS steps, and an SFT run stopped after 2 steps (for resume)."""
    from training_hub import osft, sft

    root = tmp_path_factory.mktemp("dist_ref")
    kw = dict(model_path=str(tiny_model_dir), data_path=str(data), **COMMON)
    sft(ckpt_output_dir=str(root / "sft"), max_steps=STEPS, **kw)
    osft(ckpt_output_dir=str(root / "osft"), max_steps=STEPS, unfreeze_rank_ratio=0.5, **kw)
    sft(ckpt_output_dir=str(root / "sft_2_steps"), max_steps=2, **kw)
    return root


@pytest.fixture(scope="module")
def kwargs(tiny_model_dir, data):
    return dict(model_path=str(tiny_model_dir), data_path=str(data), max_steps=STEPS, **COMMON)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    if saved is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = saved


class RankLogger(TrainingHubCallback):
    """Upstream-style callback (context-only hooks, imports inside, no-argument constructor): its class source
    reaches the two launched workers, and run_on_all_ranks makes rank 1 call it too."""

    run_on_all_ranks = True

    def on_log(self, context):
        import json
        import os

        path = os.path.join(os.environ["TRAINING_HUB_TEST_HOOKS"], f"rank{os.environ.get('RANK', '?')}.jsonl")
        with open(path, "a") as out:
            out.write(json.dumps({"step": context.step, "type": context.metrics["type"],
                                  "main": context.is_main_process}) + "\n")


@pytest.fixture(scope="module")
def ddp_run(kwargs, tmp_path_factory):
    from training_hub import sft

    out = tmp_path_factory.mktemp("ddp") / "run"
    hooks = tmp_path_factory.mktemp("hooks")
    os.environ["TRAINING_HUB_TEST_HOOKS"] = str(hooks)  # the workers inherit it
    try:
        result = sft(ckpt_output_dir=str(out), nproc_per_node=2, strategy="ddp", callbacks=[RankLogger()], **kwargs)
    finally:
        del os.environ["TRAINING_HUB_TEST_HOOKS"]
    return result, out, hooks


@pytest.mark.slow
def test_ddp_two_processes_follow_the_one_process_run(ddp_run, reference):
    result, out, _ = ddp_run
    assert result.status == "success" and result.metrics["num_processes"] == 2
    assert result.checkpoint_path == str(out / "hf_format" / "samples_28")
    assert result.metrics["final_loss"] == pytest.approx(losses(out)[-1])
    assert_same_run(out, reference / "sft", "sft ddp x2")
    assert [p.name for p in (out / "state").iterdir()] == ["step_000000004"]  # rank 0 alone wrote, once


@pytest.mark.slow
def test_callbacks_reach_launched_workers_as_class_source(ddp_run):
    _, out, hooks = ddp_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [(r["step"], r["type"]) for r in records]
    for rank, main in ((0, True), (1, False)):
        calls = [json.loads(line) for line in (hooks / f"rank{rank}.jsonl").read_text().splitlines()]
        assert [(c["step"], c["type"]) for c in calls] == expected and all(c["main"] is main for c in calls)


def test_a_callback_that_cannot_travel_is_refused_before_launch(kwargs, tmp_path):
    from training_hub import sft

    class NeedsArgument(TrainingHubCallback):
        def __init__(self, target):
            self.target = target

    with pytest.raises(ValueError, match="NeedsArgument cannot be rebuilt .* constructor without arguments"):
        sft(ckpt_output_dir=str(tmp_path / "run"), nproc_per_node=2, callbacks=[NeedsArgument(1)], **kwargs)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_fsdp2_two_processes_then_resume_follow_the_one_process_run(kwargs, reference, tmp_path):
    """FSDP2 for 2 steps, then resumed under FSDP2 to 4: the full HF checkpoint and the loss curve match. The
    training state is sharded (each rank wrote its own part); it also resumes in one process (read whole)."""
    from transformers import AutoModelForCausalLM

    from training_hub import sft

    out = tmp_path / "run"
    first = sft(ckpt_output_dir=str(out), nproc_per_node=2, strategy="fsdp2", **{**kwargs, "max_steps": 2})
    assert first.metrics["strategy"] == "fsdp2"
    model = AutoModelForCausalLM.from_pretrained(first.checkpoint_path)  # a full HF checkpoint
    assert set(load_weights(first.checkpoint_path)) == set(load_weights(reference / "sft_2_steps" / "hf_format" /
                                                                        "samples_14"))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    state = out / "state" / "step_000000002"
    assert {p.relative_to(state).as_posix() for p in state.rglob("*") if p.is_file()} == {
        "sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp", "scheduler.pt", "rng.pt", "rng_1.pt",
        "trainer_state.json"}  # no model.pt/optimizer.pt: nothing was gathered for the state
    alone = tmp_path / "alone"
    shutil.copytree(out, alone, ignore=shutil.ignore_patterns("hf_format"))
    done = sft(ckpt_output_dir=str(out), nproc_per_node=2, strategy="fsdp2", resume=True,
               resume_changes=["max_steps"], **kwargs)
    assert done.metrics["steps"] == STEPS
    shutil.rmtree(out / "hf_format" / "samples_14")  # compare the final checkpoint
    assert_same_run(out, reference / "sft", "sft fsdp2 x2 (resumed at step 2)")
    sft(ckpt_output_dir=str(alone), resume=True, resume_changes=["max_steps"], **kwargs)
    assert_same_run(alone, reference / "sft", "sft fsdp2 x2 -> 1 process (resumed from the sharded state)")


@pytest.mark.slow
def test_fsdp2_resumes_a_one_process_state(kwargs, reference, tmp_path):
    """A one-process state (model.pt, optimizer.pt) continues under FSDP2: rank 0 reads it, each rank its shards."""
    from training_hub import sft

    out = tmp_path / "run"
    shutil.copytree(reference / "sft_2_steps", out, ignore=shutil.ignore_patterns("hf_format"))
    assert (out / "state" / "step_000000002" / "model.pt").is_file()
    sft(ckpt_output_dir=str(out), nproc_per_node=2, strategy="fsdp2", resume=True, resume_changes=["max_steps"],
        **kwargs)
    assert_same_run(out, reference / "sft", "sft 1 process -> fsdp2 x2 (resumed at step 2)")


SAVE_PROBE = textwrap.dedent("""
    import json, os, time
    if os.environ.get("RANK") is not None:  # a torchrun worker: record the full-state gathers; rank 1 writes its
        from torch.distributed.checkpoint import filesystem, state_dict  # shards late, and dies in its third save
        rank, log = os.environ["RANK"], os.path.join(os.environ["TRAINING_HUB_TEST_PROBE"], "rank%s.jsonl")

        def note(**record):
            with open(log % rank, "a") as out:
                out.write(json.dumps(record) + "\\n")

        def tensors(value):
            if hasattr(value, "numel"):
                return [value]
            items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
            return [t for item in items for t in tensors(item)]

        def counted(real):
            def call(*args, **kwargs):
                result = real(*args, **kwargs)
                if kwargs.get("options") is not None and kwargs["options"].full_state_dict:
                    note(event="gather", function=real.__name__,
                         bytes=sum(t.numel() * t.element_size() for t in tensors(result)))
                return result
            return call

        state_dict.get_model_state_dict = counted(state_dict.get_model_state_dict)
        state_dict.get_state_dict = counted(state_dict.get_state_dict)
        real_write, saves = filesystem.FileSystemWriter.write_data, []

        def write_data(self, plan, planner):
            saves.append(1)
            if rank == "1":
                time.sleep(1.5)  # rank 0 has written its part long before
                if len(saves) == 3:
                    os._exit(9)  # killed while writing its shards of the third state
            note(event="shards", directory=str(self.path))
            return real_write(self, plan, planner)

        filesystem.FileSystemWriter.write_data = write_data
""")


@pytest.mark.slow
def test_fsdp2_gathers_the_model_once_per_save_and_a_killed_save_leaves_no_whole_state(kwargs, tmp_path,
                                                                                       monkeypatch):
    """Each save writes an HF checkpoint and a training state: the model is gathered to rank 0 once (for the HF
    checkpoint), the state not at all. trainer_state.json comes after every rank's shards; when a rank dies while
    writing its shards, no state with the final name appears."""
    from training_hub import sft
    from training_hub.engine.checkpoint import complete_states
    from training_hub.engine.launch import WorkerError

    shim, probe, out = tmp_path / "shim", tmp_path / "probe", tmp_path / "run"
    shim.mkdir()
    probe.mkdir()
    (shim / "sitecustomize.py").write_text(SAVE_PROBE)  # test-only: reaches the workers via PYTHONPATH
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("TRAINING_HUB_TEST_PROBE", str(probe))
    with pytest.raises(WorkerError):
        sft(ckpt_output_dir=str(out), nproc_per_node=2, strategy="fsdp2", save_samples=7,
            **{**kwargs, "max_steps": 3})
    records = [json.loads(line) for line in (probe / "rank0.jsonl").read_text().splitlines()]
    gathers = [r for r in records if r["event"] == "gather"]
    assert [r["function"] for r in gathers] == ["get_model_state_dict"] * 3  # one per HF checkpoint, none for states
    assert sorted(p.name for p in (out / "hf_format").iterdir()) == ["samples_14", "samples_21", "samples_7"]
    assert complete_states(out) == [out / "state" / "step_000000002"]  # the third state was never completed
    assert not (out / "state" / "step_000000003").exists()
    state = complete_states(out)[0]
    files = [p for p in state.rglob("*") if p.is_file() and p.name != "trainer_state.json"]
    assert {"__0_0.distcp", "__1_0.distcp", "rng_1.pt"} <= {p.name for p in files}
    assert (state / "trainer_state.json").stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in files)
    shards = sum(p.stat().st_size for p in files if p.suffix == ".distcp")
    print(f"rank 0 gathered {gathers[0]['bytes']} bytes per save (the HF export's model); the training state "
          f"({shards} bytes of model and optimizer shards) was written without a gather")
    assert gathers[0]["bytes"] < shards / 2


@pytest.mark.slow
def test_ddp_resumes_a_one_process_state(kwargs, reference, tmp_path):
    """The training state is the same under every strategy: a 1-process run continues under DDP."""
    from training_hub import sft

    out = tmp_path / "run"
    shutil.copytree(reference / "sft_2_steps", out)
    shutil.rmtree(out / "hf_format")
    sft(ckpt_output_dir=str(out), nproc_per_node=2, strategy="ddp", resume=True, resume_changes=["max_steps"],
        **kwargs)
    assert_same_run(out, reference / "sft", "sft 1 process -> ddp x2 (resumed at step 2)")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_osft_two_processes_follow_the_one_process_run(strategy, kwargs, reference, tmp_path):
    from training_hub import osft

    result = osft(ckpt_output_dir=str(tmp_path / "run"), nproc_per_node=2, strategy=strategy,
                  unfreeze_rank_ratio=0.5, **kwargs)
    assert result.status == "success"
    assert_same_run(tmp_path / "run", reference / "osft", f"osft {strategy} x2")


# ------------------------------------------------------------------------------------------ failure, Ctrl-C

FAIL_ON_RANK_1 = textwrap.dedent("""
    import os
    if os.environ.get("RANK") == "1":  # a torchrun worker of rank 1: fail in its third micro-batch
        from training_hub.engine import trainer
        real, calls = trainer.collate, []

        def collate(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("injected failure in rank 1")
            return real(*args, **kwargs)

        trainer.collate = collate
""")


def our_processes(marker: str) -> list[str]:
    """Command lines of live processes that mention ``marker`` (our launch directory lives under it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = next((line for line in (entry / "status").read_text().splitlines()
                              if line.startswith("State:")), "")
            except OSError:
                continue
            if marker in cmdline and "zombie" not in state:
                found.append(cmdline)
    return found


@pytest.mark.slow
def test_a_failing_worker_fails_the_run_promptly_with_its_error_and_leaves_no_process(kwargs, tmp_path,
                                                                                     monkeypatch):
    import tempfile

    from training_hub import sft
    from training_hub.engine.launch import WorkerError

    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(FAIL_ON_RANK_1)  # test-only: reaches the workers via PYTHONPATH
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the launch directory, in every worker's command
    start = time.monotonic()
    with pytest.raises(WorkerError, match="injected failure in rank 1") as caught:
        sft(ckpt_output_dir=str(tmp_path / "run"), nproc_per_node=2, **{**kwargs, "max_steps": 20})
    seconds = time.monotonic() - start
    print(f"failed after {seconds:.1f} s:\n{caught.value}")
    assert "collate" in str(caught.value)  # the worker's traceback comes along
    assert seconds < 90
    assert our_processes(str(tmp_path)) == []
    assert not list((tmp_path / "run").rglob("samples_*"))  # no checkpoint that looks complete


CTRL_C_CHILD = textwrap.dedent("""
    import json, sys
    from training_hub import sft
    sft(**json.loads(sys.argv[1]))
""")


@pytest.mark.slow
def test_ctrl_c_in_the_launching_process_stops_every_worker(kwargs, tmp_path):
    out = tmp_path / "run"
    params = {**kwargs, "max_steps": 10_000, "num_epochs": 1000, "ckpt_output_dir": str(out), "nproc_per_node": 2}
    child = subprocess.Popen([sys.executable, "-c", CTRL_C_CHILD, json.dumps(params)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
            assert child.poll() is None, child.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.2)
        assert our_processes(str(tmp_path))  # torchrun and both workers are running
        child.send_signal(signal.SIGINT)
        start = time.monotonic()
        stderr = child.communicate(timeout=60)[1].decode()
        print(f"stopped {time.monotonic() - start:.1f} s after Ctrl-C")
        assert child.returncode != 0 and "KeyboardInterrupt" in stderr
    finally:
        child.kill()
        child.wait()
    assert our_processes(str(tmp_path)) == []


# ------------------------------------------------------------------------------------------ multi-node

MULTI_NODE_CHILD = textwrap.dedent("""
    import json, sys
    from training_hub import sft
    result = sft(**json.loads(sys.argv[1]))
    print("RESULT " + json.dumps(dict(result)))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_launchers_as_two_nodes_give_the_single_node_result(kwargs, ddp_run, tmp_path):
    out = tmp_path / "run"  # one output directory: a shared file system, as on a cluster
    port = free_port()
    children = []
    for node_rank in (0, 1):
        params = {**kwargs, "ckpt_output_dir": str(out), "nproc_per_node": 1, "nnodes": 2, "node_rank": node_rank,
                  "rdzv_endpoint": f"127.0.0.1:{port}", "rdzv_id": "test-two-nodes"}
        children.append(subprocess.Popen([sys.executable, "-c", MULTI_NODE_CHILD, json.dumps(params)],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    for child in children:
        stdout, stderr = child.communicate(timeout=240)
        assert child.returncode == 0, stderr[-3000:]
        outputs.append(json.loads(next(line[7:] for line in stdout.splitlines() if line.startswith("RESULT "))))
    assert outputs[0] == outputs[1]  # both launchers return the run's result
    assert outputs[0]["metrics"]["num_processes"] == 2 and outputs[0]["status"] == "success"
    assert_same_run(out, ddp_run[1], "two launchers (nnodes=2) vs nproc_per_node=2")


def test_user_errors_of_a_multi_process_run_are_raised_before_launching(tiny_model_dir, tmp_path):
    """Bad data and an existing run come back as their ValueError subclasses, without starting torchrun."""
    from training_hub import sft
    from training_hub.data import DataValidationError
    from training_hub.engine.checkpoint import ExistingRunError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}]}\n')
    started = time.perf_counter()
    with pytest.raises(DataValidationError, match=r"bad\.jsonl:1"):
        sft(str(tiny_model_dir), str(bad), str(tmp_path / "out"), nproc_per_node=2)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "metrics.jsonl").write_text("{}\n")
    good = tmp_path / "good.jsonl"
    good.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    with pytest.raises(ExistingRunError, match="already holds a training run"):
        sft(str(tiny_model_dir), str(good), str(existing), nproc_per_node=2)
    assert time.perf_counter() - started < 10, "these must fail before any worker starts"
    assert not (tmp_path / "out").exists()


def test_a_process_uses_its_local_rank_modulo_the_visible_gpus():
    from training_hub.engine.distributed import cuda_device_index

    assert [cuda_device_index(r, 4) for r in range(6)] == [0, 1, 2, 3, 0, 1]
    assert cuda_device_index(3, 1) == 0  # SLURM --gpus-per-task: one visible device per process
    with pytest.raises(RuntimeError, match="no CUDA device"):
        cuda_device_index(0, 0)


def test_more_processes_than_gpus_is_refused_before_launch(monkeypatch):
    import torch

    from training_hub.engine.launch import LaunchPlan, check_gpus

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_gpus(LaunchPlan(nproc_per_node=2))
    with pytest.raises(ValueError, match="nproc_per_node=4, but this node has 2 visible GPU"):
        check_gpus(LaunchPlan(nproc_per_node=4))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_gpus(LaunchPlan(nproc_per_node=4))  # CPU processes (gloo) are not bound to devices


@pytest.mark.slow
def test_fsdp2_bf16_runs_with_a_mixed_precision_policy_and_tracks_the_fp32_run(kwargs, reference, tmp_path):
    """dtype='bfloat16' under FSDP2 (2 processes over gloo): fully_shard gets MixedPrecisionPolicy(bf16 params,
    fp32 reduction), the sharded master weights stay fp32. The loss curve stays close to the fp32 one-process run,
    and the checkpoint keeps its stored dtype."""
    from training_hub import sft

    out = tmp_path / "run"
    done = sft(ckpt_output_dir=str(out), nproc_per_node=2, strategy="fsdp2", **{**kwargs, "dtype": "bfloat16"})
    assert done.status == "success" and done.metrics["strategy"] == "fsdp2"
    got, want = losses(out), losses(reference / "sft")
    assert max(abs(a - b) for a, b in zip(got, want)) < 0.05, (got, want)  # bf16 compute: close, not exact
    weights = load_weights(done.checkpoint_path)
    assert {w.dtype for w in weights.values()} == {next(iter(load_weights(next(
        (reference / "sft" / "hf_format").iterdir())).values())).dtype}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_the_chunked_output_loss_under_two_processes_follows_the_one_process_run(strategy, kwargs, reference,
                                                                                 tmp_path, monkeypatch):
    """The chunked projection + cross-entropy (engine.loss) uses the head's weight outside the model's forward;
    DDP's and FSDP2's gradient reduction must still see it. 16 positions per chunk on the tiny model."""
    from training_hub import sft
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(kwargs["model_path"]).vocab_size
    monkeypatch.setenv("TRAINING_HUB_LOSS_CHUNK_ELEMENTS", str(16 * vocab))  # the workers inherit it
    out = tmp_path / "run"
    sft(ckpt_output_dir=str(out), nproc_per_node=2, strategy=strategy, **kwargs)
    assert_same_run(out, reference / "sft", f"sft {strategy} x2, chunked loss")


def test_the_default_strategy_is_fsdp2_on_cuda_and_ddp_on_cpu():
    from training_hub.config.algorithms import SFTConfig
    from training_hub.engine.distributed import resolve_strategy

    assert SFTConfig(model_path="m", data_path="d", ckpt_output_dir="o").strategy == "auto"
    assert resolve_strategy("auto", cuda=True) == "fsdp2" and resolve_strategy("auto", cuda=False) == "ddp"
    assert resolve_strategy("ddp", cuda=True) == "ddp" and resolve_strategy("fsdp2", cuda=False) == "fsdp2"
