"""What is read back from an output directory cannot run code; RNG state round-trips; directories follow the umask."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from training_hub.engine.checkpoint import atomic_directory, load_training_state, save_training_state


class RunsCode:
    """Unpickling this runs a shell command: what a crafted rng.pt in someone's ckpt_output_dir could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _tiny():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def _save(root: Path, step: int = 1) -> Path:
    model, optimizer, scheduler = _tiny()
    return save_training_state(root, model=model, optimizer=optimizer, scheduler=scheduler,
                               progress={"global_step": step, "samples_seen": 8})


def _load(state: Path):
    model, optimizer, scheduler = _tiny()
    return load_training_state(state, model=model, optimizer=optimizer, scheduler=scheduler, device="cpu"), model


def test_saved_state_needs_no_pickled_objects(tmp_path):
    _save(tmp_path)
    files = sorted((tmp_path / "state").rglob("*.pt"))
    assert {f.name for f in files} >= {"model.pt", "optimizer.pt", "scheduler.pt", "rng.pt"}
    for file in files:
        torch.load(file, weights_only=True)  # raises if anything but tensors and plain values is inside
    rng = torch.load(files[0].parent / "rng.pt", weights_only=True)
    assert rng["torch"].dtype == torch.uint8 and len(rng["python"]["state"]) == 625


def test_crafted_rng_file_is_refused_and_never_run(tmp_path):
    state = _save(tmp_path)
    marker = tmp_path / "MARKER"
    torch.save({"torch": torch.get_rng_state(), "python": RunsCode(marker)}, state / "rng.pt")
    model, optimizer, scheduler = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_training_state(state, model=model, optimizer=optimizer, scheduler=scheduler, device="cpu")
    message = str(info.value)
    assert str(state / "rng.pt") in message and "cannot be read safely" in message
    assert "start a new run" in message
    assert not marker.exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-restored


def test_crafted_model_file_is_refused_too(tmp_path):
    state = _save(tmp_path)
    marker = tmp_path / "MARKER"
    torch.save({"weight": RunsCode(marker)}, state / "model.pt")
    with pytest.raises(ValueError, match="model.pt cannot be read safely"):
        _load(state)
    assert not marker.exists()


def test_rng_round_trip_restores_the_sequences(tmp_path):
    model, optimizer, scheduler = _tiny()
    torch.manual_seed(123)
    random.seed(456)
    torch.rand(3), random.random(), random.gauss(0, 1)  # gauss leaves a cached value (gauss_next) in the state
    state = save_training_state(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler,
                                progress={"global_step": 7})
    expected = (torch.rand(5), [random.random() for _ in range(5)], random.gauss(0, 1))
    torch.manual_seed(0)
    random.seed(0)
    progress, _ = _load(state)
    assert progress == {"global_step": 7}
    got = (torch.rand(5), [random.random() for _ in range(5)], random.gauss(0, 1))
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_rng_state_of_the_earlier_format_still_resumes(tmp_path):
    """Earlier versions saved random.getstate()'s tuple and every CUDA device's state: plain values, read safely."""
    state = _save(tmp_path)
    random.seed(5)
    torch.manual_seed(5)
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": []}, state / "rng.pt")
    expected = (torch.rand(3), random.random())
    random.seed(0)
    torch.manual_seed(0)
    _load(state)
    got = (torch.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o002, 0o775), (0o077, 0o700)])
def test_atomic_directory_follows_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        with atomic_directory(tmp_path / "out" / "samples_8") as tmp:
            (tmp / "f").write_text("x")
        plain = tmp_path / "plain"
        plain.mkdir()
    finally:
        os.umask(previous)
    assert (tmp_path / "out" / "samples_8").stat().st_mode & 0o777 == mode == plain.stat().st_mode & 0o777


def test_saved_state_directory_follows_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        state = _save(tmp_path)
    finally:
        os.umask(previous)
    assert state.stat().st_mode & 0o777 == 0o755


def test_a_handed_over_state_dict_is_cast_in_place_freeing_each_fp32_tensor_and_keeping_ties():
    """The FSDP2 export: the gathered fp32 weights are cast one tensor at a time, not beside a whole bf16 copy."""
    import gc
    import weakref

    from training_hub.engine.checkpoint import cast_state_dict

    embed = torch.randn(8, 4)
    state = {"embed.weight": embed, "head.weight": embed, "norm.weight": torch.ones(4), "step": torch.tensor(3)}
    originals = [weakref.ref(embed), weakref.ref(state["norm.weight"])]
    del embed
    out = cast_state_dict(state, torch.bfloat16, state)
    gc.collect()
    assert out is state
    assert [ref() for ref in originals] == [None, None]  # nothing kept the fp32 tensors alive
    assert state["embed.weight"] is state["head.weight"] and state["embed.weight"].dtype == torch.bfloat16
    assert state["step"].dtype == torch.int64
    model_state = {"w": torch.randn(2, 2)}
    copy = cast_state_dict(model_state, torch.bfloat16, {})
    assert model_state["w"].dtype == torch.float32 and copy["w"].dtype == torch.bfloat16  # the model's own: untouched
