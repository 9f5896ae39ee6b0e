"""checkpoint_storage: checkpoints and training states mirrored to S3 (a real S3 server: moto, on 127.0.0.1), a
restarted run resuming from the bucket by itself, and an upload cut short by a kill (engine/storage.py)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from training_hub import TrainingHubCallback, sft
from training_hub.config.declare import ParameterError
from training_hub.engine import metrics, storage

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

BUCKET = "training-hub-ckpts"
COMMON = dict(num_epochs=1, effective_batch_size=8, max_seq_len=128, max_tokens_per_gpu=4096, learning_rate=1e-3,
              lr_scheduler="constant", disable_progress_bar=True, save_samples=16)  # 48 samples: 6 steps of 8


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on a free port of 127.0.0.1 with one bucket; the environment points boto at it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        patch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        patch.delenv("AWS_PROFILE", raising=False)
        import boto3

        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
        yield env
    server.stop()


@pytest.fixture
def url(s3_server, request):
    return f"s3://{BUCKET}/{request.node.name.replace('[', '-').rstrip(']')}"


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    from test_engine_train import write_chat

    return write_chat(tmp_path_factory.mktemp("data") / "chat.jsonl")


def remote(url: str, kind: str) -> dict[str, bool]:
    return storage.remote_entries(storage.filesystem(url), kind)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if '"type": "train"' in line]


def test_storage_values_are_checked_before_training(tiny_model_dir, chat_data, tmp_path):
    assert storage.storage_url(None) is None and storage.storage_url("pvc") is None
    assert storage.storage_url("s3://bucket/prefix/") == "s3://bucket/prefix"
    with pytest.raises(ParameterError, match=r"checkpoint_storage: must be None, 'pvc'.*got 'bucket/prefix'"):
        sft(str(tiny_model_dir), str(chat_data), str(tmp_path / "run"), checkpoint_storage="bucket/prefix", **COMMON)
    assert not (tmp_path / "run").exists()


def test_an_unusable_bucket_fails_before_anything_is_written(s3_server, tiny_model_dir, chat_data, tmp_path):
    with pytest.raises(storage.CheckpointStorageError, match=r"s3://no-such-bucket/x.*is not usable.*"
                                                             r"AWS_ENDPOINT_URL"):
        sft(str(tiny_model_dir), str(chat_data), str(tmp_path / "run"), checkpoint_storage="s3://no-such-bucket/x",
            **COMMON)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_stopped_run_is_mirrored_and_a_fresh_machine_resumes_from_the_bucket(tiny_model_dir, chat_data, tmp_path,
                                                                                 url, monkeypatch, caplog):
    real_write = metrics.MetricsWriter.write

    def write(self, record):  # preemption: SIGTERM while step 4 is logged
        real_write(self, record)
        if record.get("step") == 4 and record.get("type") == "train":
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(metrics.MetricsWriter, "write", write)
    first = sft(str(tiny_model_dir), str(chat_data), str(tmp_path / "a"), checkpoint_storage=url, **COMMON)
    monkeypatch.setattr(metrics.MetricsWriter, "write", real_write)
    assert first.status == "stopped" and first.metrics["steps"] == 4
    # Everything was uploaded before sft() returned, each directory closed by its marker; one state is kept.
    assert remote(url, "state") == {"step_000000004": True}
    assert remote(url, "hf_format") == {"samples_16": True, "samples_32": True}
    fs = storage.filesystem(url)
    marker = json.loads(fs.cat_file(f"state/step_000000004/{storage.COMPLETE_MARKER}"))
    assert {"model.pt", "optimizer.pt", "trainer_state.json"} <= set(marker["files"])
    assert not (tmp_path / "a" / storage.STAGING_DIR).exists()

    # A new machine: an empty output directory, the same call (no resume=True): it continues at step 5.
    with caplog.at_level(logging.INFO, logger="training_hub"):
        second = sft(str(tiny_model_dir), str(chat_data), str(tmp_path / "b"), checkpoint_storage=url, **COMMON)
    assert "restoring s3://" in caplog.text and "step_000000004" in caplog.text
    assert second.status == "success" and second.metrics["steps"] == 6
    steps = records(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]  # 1-4 came from the bucket, 5-6 were trained here
    assert steps[:4] == records(tmp_path / "a" / "metrics.jsonl")[:4]
    assert remote(url, "state") == {"step_000000006": True}
    assert remote(url, "hf_format") == {"samples_16": True, "samples_32": True, "samples_48": True}
    assert Path(second.checkpoint_path).name == "samples_48"


@pytest.mark.slow
def test_a_failed_upload_fails_the_run_after_training_and_leaves_the_local_run_whole(tiny_model_dir, chat_data,
                                                                                    tmp_path, url, monkeypatch):
    import training_hub.storage as uploads

    real_put = uploads._put

    def put(fs, local, remote, *args):
        if local.name == "optimizer.pt":
            raise OSError("bucket quota exceeded")
        real_put(fs, local, remote, *args)

    monkeypatch.setattr(uploads, "_put", put)
    with pytest.raises(storage.CheckpointStorageError, match=r"1 upload\(s\).*state/step_000000002: OSError: bucket "
                                                             r"quota exceeded.*local checkpoints in .* are complete"):
        sft(str(tiny_model_dir), str(chat_data), str(tmp_path / "a"), checkpoint_storage=url,
            **dict(COMMON, max_steps=2, save_samples=None))
    assert (tmp_path / "a" / "state" / "step_000000002" / "trainer_state.json").is_file()
    assert remote(url, "state") == {"step_000000002": False}  # what arrived has no marker: never restored
    assert remote(url, "hf_format") == {"samples_16": True}


KILLED_RUN = """
import sys, time
from pathlib import Path
from training_hub import TrainingHubCallback, sft
from training_hub import storage

real_put, flag = storage._put, Path(sys.argv[4])

def put(fs, local, remote, *args):  # the upload of the second state stalls half-way: the test kills us then
    if remote.startswith("state/") and not remote.startswith("state/step_000000002/") and local.name == "optimizer.pt":
        flag.write_text(remote)
        time.sleep(600)
    real_put(fs, local, remote, *args)

# The mirror skips a state when a newer one is already queued: keep step 4's state from being queued before
# step 2's is uploaded (on a slow machine training outruns the uploads), so the test sees both.
class WaitForTheFirstState(TrainingHubCallback):

    def on_step_end(self, ctx):
        if ctx.step == 3:
            fs, deadline = storage.filesystem(sys.argv[5]), time.monotonic() + 120
            while not storage.remote_entries(fs, "state").get("step_000000002") and time.monotonic() < deadline:
                time.sleep(0.2)
                fs.invalidate_cache()

storage._put = put
sft(sys.argv[1], sys.argv[2], sys.argv[3], checkpoint_storage=sys.argv[5], callbacks=[WaitForTheFirstState()],
    **{COMMON!r})
"""


@pytest.mark.slow
def test_a_kill_during_an_upload_leaves_an_unmarked_state_that_resume_skips(tiny_model_dir, chat_data, tmp_path,
                                                                             url, caplog):
    flag = tmp_path / "uploading"
    script = textwrap.dedent(KILLED_RUN.replace("{COMMON!r}", repr(COMMON)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", script, str(tiny_model_dir), str(chat_data), str(tmp_path / "a"),
                              str(flag), url], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not flag.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert flag.exists(), child.stderr.read().decode()[-3000:] if child.poll() is not None else "timed out"
        fs, stalled = storage.filesystem(url), flag.read_text().rsplit("/", 1)[0]
        while not fs.exists(f"{stalled}/model.pt") and time.monotonic() < deadline:  # the state's other files
            time.sleep(0.2)
            fs.invalidate_cache()
    finally:
        child.kill()  # SIGKILL: nothing of the process runs after this
        child.wait()
    states = remote(url, "state")
    assert states["step_000000002"] is True and states[stalled.split("/")[1]] is False  # partly there, no marker
    assert fs.exists(f"{stalled}/model.pt")

    with caplog.at_level(logging.INFO, logger="training_hub"):
        second = sft(str(tiny_model_dir), str(chat_data), str(tmp_path / "b"), checkpoint_storage=url, **COMMON)
    assert "step_000000002" in caplog.text  # the complete state, not the newer unmarked one
    steps = records(tmp_path / "b" / "metrics.jsonl")
    assert second.status == "success" and [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert remote(url, "state") == {"step_000000006": True}  # the unmarked upload was replaced or removed


class PreemptAtStep4(TrainingHubCallback):
    """Sends this process SIGTERM (a preemption notice) at the end of optimizer step 4."""

    def on_step_end(self, ctx):
        if ctx.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_trl_backend_saves_on_sigterm_mirrors_and_resumes_from_the_bucket(tiny_model_dir, chat_data, tmp_path, url):
    pytest.importorskip("trl")
    trl = dict(COMMON, backend="trl", checkpoint_storage=url)
    first = sft(str(tiny_model_dir), str(chat_data), str(tmp_path / "a"), enable_jit_checkpoint=True,
                callbacks=[PreemptAtStep4()], **trl)
    assert first.status == "stopped" and first.metrics["stopped_by"] == "SIGTERM" and first.metrics["steps"] == 4
    assert remote(url, "trl_state") == {"checkpoint-4": True}  # the older checkpoint-2 is pruned remotely

    second = sft(str(tiny_model_dir), str(chat_data), str(tmp_path / "b"), **trl)  # a fresh machine
    assert second.status == "success" and second.metrics["steps"] == 6
    assert (tmp_path / "b" / "trl_state" / "checkpoint-4").is_dir()  # restored, then continued from
    assert [r["step"] for r in records(tmp_path / "b" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert remote(url, "trl_state") == {"checkpoint-6": True}
    assert Path(second.checkpoint_path).name in remote(url, "hf_format")


# ------------------------------------------------------------------------------------------------ upstream's callbacks


def test_jit_callback_turns_sigterm_into_one_save_and_a_stop(tmp_path):
    from types import SimpleNamespace

    from training_hub import JITCheckpointCallback, TrainingHubControl
    from training_hub.checkpoint_utils import incomplete_sidecar_path

    callback = JITCheckpointCallback()
    before = signal.getsignal(signal.SIGTERM)
    ctx = SimpleNamespace(output_dir=str(tmp_path), step=3, is_main_process=True, metrics={}, control=None)
    callback.on_train_begin(ctx)
    try:
        ctx.control = TrainingHubControl()
        callback.on_step_end(ctx)
        assert not ctx.control.should_save and not ctx.control.should_training_stop
        os.kill(os.getpid(), signal.SIGTERM)  # caught: the process lives on
        callback.on_step_end(ctx)
        assert ctx.control.should_save and ctx.control.should_training_stop
        assert incomplete_sidecar_path(tmp_path, 3).exists()
        ctx.control = TrainingHubControl()
        callback.on_epoch_end(ctx)  # the save is asked once; the stop stays
        assert not ctx.control.should_save and ctx.control.should_training_stop
        callback.on_save(ctx)
        assert not incomplete_sidecar_path(tmp_path, 3).exists()
    finally:
        callback.on_train_end(ctx)
    assert signal.getsignal(signal.SIGTERM) == before


def test_remote_sync_callback_mirrors_each_saved_checkpoint(tmp_path, url, monkeypatch):
    from types import SimpleNamespace

    from training_hub import RemoteCheckpointSyncCallback, merge_default_callbacks
    from training_hub.checkpoint_utils import UPLOAD_URI_ENV

    chosen = merge_default_callbacks(None, enable_jit_checkpoint=True, ckpt_output_dir=str(tmp_path),
                                     backend="lora_sft", checkpoint_storage=url)
    assert [type(c).__name__ for c in chosen] == ["JITCheckpointCallback", "RemoteCheckpointSyncCallback"]
    assert merge_default_callbacks([], enable_jit_checkpoint=True, ckpt_output_dir=str(tmp_path), backend="sft",
                                   checkpoint_storage=url) == []
    monkeypatch.setenv(UPLOAD_URI_ENV, url)
    callback = RemoteCheckpointSyncCallback()  # the URL from the environment, as upstream
    for step in (5, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"w" * step)
        callback.on_save(SimpleNamespace(output_dir=str(tmp_path), step=step, is_main_process=True, metrics={},
                                         checkpoint_path=None, control=None))
    callback.on_train_end(None)
    fs = storage.filesystem(url)
    assert fs.cat_file("checkpoint-10/model.safetensors") == b"w" * 10
    assert all(fs.exists(f"checkpoint-{step}/{storage.COMPLETE_MARKER}") for step in (5, 10))  # each one
    assert not any((tmp_path / storage.STAGING_DIR).rglob("*"))  # the staged copies are gone


def test_find_latest_valid_checkpoint_knows_the_native_layout(tmp_path):
    from training_hub.checkpoint_utils import TRAINING_HUB_LAYOUT, find_latest_valid_checkpoint

    for step, complete in ((2, True), (4, True), (6, False)):  # step 6: its trainer_state.json was never written
        (tmp_path / "state" / f"step_{step:09d}").mkdir(parents=True)
        if complete:
            (tmp_path / "state" / f"step_{step:09d}" / "trainer_state.json").write_text("{}")
    assert find_latest_valid_checkpoint(tmp_path, layouts=(TRAINING_HUB_LAYOUT,)).endswith("step_000000004")
    with pytest.raises(ValueError, match="layouts: unknown"):
        find_latest_valid_checkpoint(tmp_path, layouts=("nope",))


def test_enable_jit_checkpoint_resumes_a_restarted_run_by_itself(tmp_path):
    from types import SimpleNamespace

    from training_hub.engine.checkpoint import ExistingRunError

    state = tmp_path / "state" / "step_000000004"
    state.mkdir(parents=True)
    (state / "trainer_state.json").write_text("{}")
    plain = SimpleNamespace(resume=False, enable_jit_checkpoint=False, checkpoint_storage=None)
    with pytest.raises(ExistingRunError, match="Pass resume=True"):
        storage.open_output_dir(plain, tmp_path)
    for jit in (SimpleNamespace(resume=False, enable_jit_checkpoint=True, checkpoint_storage="pvc"),
                SimpleNamespace(resume=False, on_demand_checkpointing=True, checkpoint_storage=None)):
        assert storage.open_output_dir(jit, tmp_path) == state
    assert storage.open_output_dir(jit, tmp_path / "fresh") is None  # nothing to resume: a fresh start, no error
