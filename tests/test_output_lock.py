"""One run per output directory: a live run holds ckpt_output_dir (an flock the OS drops when it dies)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_data_validate import GOOD, write_lines
from training_hub import sft
from training_hub.fsutil import LOCK_FILE, DirectoryInUseError, check_not_claimed, claim_directory

HOLD = """
import sys, time
from training_hub.fsutil import claim_directory
with claim_directory(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """A separate process that holds the claim on tmp_path/run until killed."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield out, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_second_sft_fails_fast_naming_the_dir_and_pid_then_works_after_sigkill(tiny_model_dir, tmp_path, holder):
    out, proc = holder
    data = write_lines(tmp_path / "d.jsonl", [GOOD] * 4)
    for resume in (False, True):  # a resume while the first run is live fails the same way
        started = time.monotonic()
        with pytest.raises(DirectoryInUseError) as info:
            sft(str(tiny_model_dir), str(data), str(out), max_seq_len=128, resume=resume,
                disable_progress_bar=True)
        assert time.monotonic() - started < 5
        assert str(out) in str(info.value) and f"process {proc.pid}" in str(info.value)
    assert isinstance(info.value, ValueError)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing of ours was written

    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    check_not_claimed(out)  # the OS dropped the lock with the process
    with claim_directory(out) as root:
        assert (root / LOCK_FILE).read_text().strip() == str(os.getpid())


def test_claim_creates_the_directory_and_releases_on_error(tmp_path):
    out = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError):
        with claim_directory(out):
            assert out.is_dir()
            with pytest.raises(DirectoryInUseError, match=str(os.getpid())):
                with claim_directory(out):  # a second claim, even in the same process, is refused
                    pass
            raise RuntimeError("boom")
    with claim_directory(out):  # released by the failure
        pass


def test_lock_file_alone_is_not_a_run(tmp_path):
    from training_hub.engine.checkpoint import check_output_dir

    out = tmp_path / "run"
    with claim_directory(out):
        pass
    assert check_output_dir(Path(out), resume=False) is None


def test_workers_other_than_rank_0_do_not_claim(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with claim_directory(out):
        assert not (out / LOCK_FILE).exists()
        monkeypatch.setenv("RANK", "0")
        with claim_directory(out):
            assert (out / LOCK_FILE).exists()


@pytest.mark.parametrize("algorithm,backend", [("sft", "native"), ("sft", "trl"), ("dpo", "native"), ("dpo", "trl")])
def test_a_finished_run_leaves_its_directory_free(tiny_model_dir, tmp_path, algorithm, backend):
    import training_hub
    from test_dpo import preference_records

    if backend == "trl":
        pytest.importorskip("trl")
    out = tmp_path / "run"
    if algorithm == "sft":
        data = write_lines(tmp_path / "d.jsonl", [GOOD] * 8)
        kwargs = dict(max_seq_len=128)
    else:
        data = write_lines(tmp_path / "p.jsonl", preference_records())
        kwargs = dict(max_seq_len=256, max_tokens_per_gpu=4096)
    getattr(training_hub, algorithm)(str(tiny_model_dir), str(data), str(out), backend=backend, max_steps=1,
                                     effective_batch_size=4, disable_progress_bar=True, **kwargs)
    assert (out / LOCK_FILE).exists()
    check_not_claimed(out)
