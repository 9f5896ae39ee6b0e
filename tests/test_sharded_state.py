"""Sharded training state (engine/sharded.py, torch.distributed.checkpoint) in one process: it round-trips through
``load_training_state``, crafted metadata or values are refused without running, and the storage mirror carries
the whole directory. The FSDP2 runs (two processes) are in test_distributed.py."""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from training_hub.engine import checkpoint as ckpt
from training_hub.engine import distributed, sharded


class RunsCode:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():  # DCP warns that it runs without a process group: that is the point here
        warnings.simplefilter("ignore", UserWarning)
        yield


def _tiny(seed: int = 0, steps: int = 1, bf16_moments: bool = False):
    from training_hub.engine.optim import AdamWBF16States

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = (AdamWBF16States if bf16_moments else torch.optim.AdamW)(model.parameters(), lr=1e-2,
                                                                         weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    for _ in range(steps):
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def _save(root: Path, step: int = 3, bf16_moments: bool = False) -> Path:
    model, optimizer, scheduler = _tiny(steps=2, bf16_moments=bf16_moments)
    assert sharded.save(root, model=model, optimizer=optimizer, scheduler=scheduler,
                        progress={"global_step": step, "samples_seen": 8}, ranks=distributed.SINGLE)
    return root / ckpt.STATE_DIR / f"step_{step:09d}"


def _train_on(model, optimizer) -> list[float]:
    torch.manual_seed(1)
    out = []
    for _ in range(2):
        loss = model(torch.randn(2, 4)).pow(2).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        out.append(loss.item())
    return out


@pytest.mark.parametrize("bf16_moments", [False, True])
def test_a_sharded_state_resumes_whole_in_one_process(tmp_path, bf16_moments):
    state = _save(tmp_path, bf16_moments=bf16_moments)
    assert ckpt.complete_states(tmp_path) == [state] and ckpt.is_sharded(state)
    assert {p.name for p in state.iterdir()} == {"sharded", "scheduler.pt", "rng.pt", "trainer_state.json"}
    assert not list((tmp_path / "state").glob(".tmp-*"))
    saved_model, saved_optimizer, _ = _tiny(steps=2, bf16_moments=bf16_moments)

    model, optimizer, scheduler = _tiny(seed=5, steps=0, bf16_moments=bf16_moments)  # not yet stepped
    progress = ckpt.load_training_state(state, model=model, optimizer=optimizer, scheduler=scheduler, device="cpu")
    assert progress == {"global_step": 3, "samples_seen": 8}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved_model.state_dict().values()))
    assert scheduler.last_epoch == 2 and optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 3)
    assert _train_on(model, optimizer) == _train_on(saved_model, saved_optimizer)  # moments and steps came back


def test_ranks_that_do_not_share_the_directory_write_nothing_and_fall_back(tmp_path, monkeypatch, caplog):
    model, optimizer, scheduler = _tiny()
    monkeypatch.setattr(distributed, "all_sum", lambda ranks, *values: (0.0,))  # as if another rank saw no directory
    assert not sharded.save(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler,
                            progress={"global_step": 1}, ranks=distributed.SINGLE)
    assert list((tmp_path / "state").iterdir()) == [] and "do not share ckpt_output_dir" in caplog.text


def test_a_failed_write_raises_and_leaves_no_state(tmp_path, monkeypatch):
    from torch.distributed.checkpoint import FileSystemWriter

    def full_disk(self, plan, planner):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", full_disk)
    model, optimizer, scheduler = _tiny()
    with pytest.raises(RuntimeError, match="writing the sharded training state into .* failed.*No space left"):
        sharded.save(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, progress={"global_step": 1},
                     ranks=distributed.SINGLE)
    assert list((tmp_path / "state").iterdir()) == []  # the temporary directory went too


def test_a_newer_sharded_state_replaces_the_older(tmp_path):
    _save(tmp_path, step=3)
    newer = _save(tmp_path, step=5)
    assert ckpt.complete_states(tmp_path) == [newer]


def test_crafted_metadata_is_refused_and_never_run(tmp_path):
    state = _save(tmp_path)
    marker = tmp_path / "MARKER"
    (state / "sharded" / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    model, optimizer, scheduler = _tiny(steps=0)
    with pytest.raises(ValueError, match=r"\.metadata cannot be read safely.*posix.system.*Delete the training "
                                         r"state") as info:
        ckpt.load_training_state(state, model=model, optimizer=optimizer, scheduler=scheduler, device="cpu")
    assert str(state) in str(info.value) and not marker.exists()


def test_a_crafted_value_in_the_shards_is_refused_and_never_run(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    state = _save(tmp_path)
    marker = tmp_path / "MARKER"
    model, optimizer, _ = _tiny(steps=1)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    optimizer_state["param_groups"][0]["lr"] = RunsCode(marker)  # stored by DCP as a pickled value
    dcp.save({"model": model_state, "optim": optimizer_state}, storage_writer=dcp.FileSystemWriter(state / "sharded"),
             no_dist=True)
    model, optimizer, scheduler = _tiny(steps=0)
    with pytest.raises(ValueError, match=r"optim.param_groups.* cannot be read safely"):
        ckpt.load_training_state(state, model=model, optimizer=optimizer, scheduler=scheduler, device="cpu")
    assert not marker.exists()


def test_each_rank_restores_its_own_rng_and_a_rank_without_one_takes_rank_0s(tmp_path):
    state = _save(tmp_path)
    torch.manual_seed(11)
    torch.save(ckpt._rng_state(), state / ckpt.rng_file(1))  # as rank 1 of a two-process run writes it
    expected_rank_1 = torch.rand(3)
    model, optimizer, scheduler = _tiny(steps=0)
    ckpt.load_training_state(state, model=None, optimizer=None, scheduler=scheduler, device="cpu", rank=1)
    assert torch.equal(torch.rand(3), expected_rank_1)
    ckpt.load_training_state(state, model=None, optimizer=None, scheduler=scheduler, device="cpu", rank=2)
    rank_0 = torch.rand(3)
    ckpt.load_training_state(state, model=None, optimizer=None, scheduler=scheduler, device="cpu", rank=0)
    assert torch.equal(torch.rand(3), rank_0) and not torch.equal(rank_0, expected_rank_1)


def test_the_storage_mirror_carries_a_sharded_state_whole(tmp_path):
    from training_hub.engine import storage

    root = tmp_path / "run"
    state = _save(root)
    (state / "sharded" / "__1_0.distcp").write_bytes(b"rank 1's shards")  # as a second rank adds its file
    url = (tmp_path / "bucket").as_uri()
    mirror = storage.Mirror(url, root)
    mirror.add(state)
    assert mirror.finish() == []
    fs = storage.filesystem(url)
    listed = json.loads(fs.cat_file(f"state/{state.name}/{storage.COMPLETE_MARKER}"))["files"]
    local = {p.relative_to(state).as_posix() for p in state.rglob("*") if p.is_file()}
    assert set(listed) == local >= {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"}

    fresh = tmp_path / "fresh"
    restored = storage.restore(fs, url, fresh)
    assert restored == fresh / "state" / state.name
    assert {p.relative_to(restored).as_posix(): p.read_bytes() for p in restored.rglob("*") if p.is_file()} == {
        p.relative_to(state).as_posix(): p.read_bytes() for p in state.rglob("*") if p.is_file()}
