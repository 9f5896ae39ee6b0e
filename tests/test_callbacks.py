"""TrainingHubCallback hooks fire with real values: native sft (train_sft), native lora (LoRAMethod), native dpo
(train_dpo) and trl sft (through the TrainerCallback bridge), on short tiny-model runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training_hub import TrainingHubCallback, TrainingResult


class Recorder(TrainingHubCallback):
    def __init__(self):
        self.events: list[tuple] = []

    def on_train_begin(self, ctx):
        self.events.append(("begin", ctx.algorithm, ctx.backend, ctx.step, ctx.total_steps, ctx.output_dir))

    def on_step_end(self, ctx, metrics):
        self.events.append(("step", ctx.step, metrics["step"], metrics["loss"], ctx.epoch))

    def on_evaluate(self, ctx, metrics):
        self.events.append(("evaluate", ctx.step, metrics["loss"]))

    def on_save(self, ctx, checkpoint_path):
        self.events.append(("save", ctx.step, checkpoint_path, Path(checkpoint_path).is_dir()))

    def on_train_end(self, ctx, result):
        self.events.append(("end", ctx.step, result))

    def kinds(self) -> list[str]:
        return [e[0] for e in self.events]


@pytest.fixture(scope="module")
def chat_path(tmp_path_factory):
    from training_hub.tiny import demo_data_path

    rows = demo_data_path().read_text().splitlines()[:16]
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def check_run(recorder: Recorder, result, out: Path, *, algorithm: str, backend: str, steps: int):
    kinds = recorder.kinds()
    assert kinds[0] == "begin" and kinds[-1] == "end"
    begin = recorder.events[0]
    assert begin[1:4] == (algorithm, backend, 0) and begin[4] == steps and begin[5] == str(out)
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["type"] == "train"]
    step_events = [e for e in recorder.events if e[0] == "step"]
    # one on_step_end per metrics.jsonl line, with the same loss, and the context already at that step
    assert [(e[1], e[2], e[3]) for e in step_events] == [(r["step"], r["step"], r["loss"]) for r in train]
    assert step_events[-1][4] > 0  # epoch progress
    saves = [e for e in recorder.events if e[0] == "save"]
    assert saves and all(e[3] for e in saves)  # each path exists when the hook runs
    assert saves[-1][2] == result.checkpoint_path
    end = recorder.events[-1]
    assert end[1] == steps and end[2] is result and isinstance(result, TrainingResult)
    return saves


def test_native_sft_hooks(tiny_model_dir, chat_path, tmp_path):
    from training_hub import sft

    recorder, out = Recorder(), tmp_path / "sft"
    result = sft(str(tiny_model_dir), str(chat_path), str(out), callbacks=recorder, max_seq_len=256,
                 effective_batch_size=4, save_samples=8, validation_split=0.25, eval_steps=2,
                 learning_rate=1e-3, disable_progress_bar=True)  # 12 training samples: 3 steps
    saves = check_run(recorder, result, out, algorithm="sft", backend="native", steps=3)
    assert [Path(e[2]).name for e in saves] == ["samples_8", "samples_12"]  # every save_samples, and the final
    evaluations = [e for e in recorder.events if e[0] == "evaluate"]
    assert [e[1] for e in evaluations] == [2, 3] and all(e[2] > 0 for e in evaluations)  # eval_steps, epoch end


def test_native_lora_and_dpo_hooks(tiny_model_dir, chat_path, tmp_path):
    pytest.importorskip("peft")
    from training_hub import dpo, lora_sft

    recorder, out = Recorder(), tmp_path / "lora"
    result = lora_sft(str(tiny_model_dir), str(chat_path), str(out), callbacks=[recorder], max_seq_len=256,
                      effective_batch_size=8, max_steps=2, learning_rate=1e-3, disable_progress_bar=True)
    check_run(recorder, result, out, algorithm="lora_sft", backend="native", steps=2)

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Say {w}.", "chosen": w, "rejected": "no"}) + "\n"
                             for w in ["yes", "hello", "blue", "seven"]))
    recorder, out = Recorder(), tmp_path / "dpo"
    result = dpo(str(tiny_model_dir), str(pairs), str(out), callbacks=[recorder], max_seq_len=64,
                 effective_batch_size=2, max_steps=2, learning_rate=1e-3, disable_progress_bar=True)
    check_run(recorder, result, out, algorithm="dpo", backend="native", steps=2)


def test_trl_sft_hooks_through_the_bridge(tiny_model_dir, chat_path, tmp_path):
    pytest.importorskip("trl")
    from training_hub import sft

    recorder, upstream_style, out = Recorder(), UpstreamStyle(), tmp_path / "trl"
    result = sft(str(tiny_model_dir), str(chat_path), str(out), backend="trl", callbacks=[recorder, upstream_style],
                 max_seq_len=256, max_tokens_per_gpu=4 * 256, effective_batch_size=4, max_steps=2, save_samples=4,
                 learning_rate=1e-3, disable_progress_bar=True)
    saves = check_run(recorder, result, out, algorithm="sft", backend="trl", steps=2)
    names = [Path(e[2]).name for e in saves]
    assert names[:2] == ["checkpoint-1", "checkpoint-2"] and names[-1].startswith("samples_")
    kinds = [c[0] for c in upstream_style.calls]
    assert kinds.count("step_begin") == kinds.count("step_end") == kinds.count("log") == 2
    assert kinds[:3] == ["begin", "epoch_begin", "step_begin"] and kinds[-1] == "end"
    assert [c[1] for c in upstream_style.calls if c[0] == "save"] == names


def test_callbacks_must_be_callback_objects():
    from training_hub import sft

    with pytest.raises(ValueError, match="callbacks: expected TrainingHubCallback instances, got function"):
        sft("/m", "/d", "/o", callbacks=[lambda ctx: None])


class UpstreamStyle(TrainingHubCallback):
    """Written for the upstream Training Hub: context-only hooks, the upstream context name."""

    def __init__(self):
        self.calls = []

    def on_train_begin(self, context):
        self.calls.append(("begin", context.output_dir, context.is_main_process))

    def on_epoch_begin(self, context):
        self.calls.append(("epoch_begin", context.epoch))

    def on_step_begin(self, context):
        self.calls.append(("step_begin", context.step))

    def on_step_end(self, context):
        self.calls.append(("step_end", context.step, context.loss, context.learning_rate))

    def on_log(self, context):
        self.calls.append(("log", context.metrics["type"], context.metrics["step"]))

    def on_evaluate(self, context):
        self.calls.append(("evaluate", context.metrics["loss"]))

    def on_save(self, context):
        self.calls.append(("save", Path(context.checkpoint_path).name))

    def on_epoch_end(self, context):
        self.calls.append(("epoch_end", context.epoch))

    def on_train_end(self, context):
        self.calls.append(("end", context.step))


def test_upstream_style_callbacks_run_unchanged(tiny_model_dir, chat_path, tmp_path):
    from training_hub import sft
    from training_hub.callbacks import TrainingHubContext  # the upstream import path works

    assert TrainingHubContext is __import__("training_hub").TrainingContext
    callback, out = UpstreamStyle(), tmp_path / "sft"
    sft(str(tiny_model_dir), str(chat_path), str(out), callbacks=[callback], max_seq_len=256, num_epochs=2,
        effective_batch_size=8, validation_split=0.25, learning_rate=1e-3, disable_progress_bar=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    kinds = [c[0] for c in callback.calls]
    assert kinds[0] == "begin" and callback.calls[0][1:] == (str(out), True) and kinds[-1] == "end"
    assert kinds.count("epoch_begin") == kinds.count("epoch_end") == 2
    assert kinds.count("step_begin") == len(train) == 4  # 12 training samples, 8 per step, 2 epochs
    assert [c[1:] for c in callback.calls if c[0] == "step_end"] == [(r["step"], r["loss"], r["lr"]) for r in train]
    assert [c[1:] for c in callback.calls if c[0] == "log"] == [(r["type"], r["step"]) for r in records]
    assert [c[1] for c in callback.calls if c[0] == "evaluate"] == [r["loss"] for r in records
                                                                    if r["type"] == "validation"]
    assert [c[1] for c in callback.calls if c[0] == "save"] == ["samples_24"]
    # order within an epoch: epoch_begin, (step_begin, step_end, log)+, evaluate, log, epoch_end
    first_epoch = kinds[1:kinds.index("epoch_end") + 1]
    assert first_epoch == ["epoch_begin", "step_begin", "step_end", "log", "step_begin", "step_end", "log",
                           "evaluate", "log", "epoch_end"]


def test_a_failing_hook_is_logged_and_training_goes_on(tiny_model_dir, chat_path, tmp_path, caplog):
    from training_hub import sft

    class Failing(TrainingHubCallback):
        def on_step_end(self, ctx, metrics):
            raise RuntimeError("boom")

    result = sft(str(tiny_model_dir), str(chat_path), str(tmp_path / "o"), callbacks=[Failing()], max_seq_len=256,
                 effective_batch_size=8, learning_rate=1e-3, disable_progress_bar=True)
    assert result.status == "success" and result.metrics["steps"] == 2
    assert caplog.text.count("Failing.on_step_end raised; training goes on") == 2
    assert "RuntimeError: boom" in caplog.text


class Steering(TrainingHubCallback):
    """Upstream style: asks for a save after step 1 and for the end of training after step 2."""

    def on_step_end(self, context):
        if context.step == 1:
            context.control.should_save = True
        if context.step == 2:
            context.control.should_training_stop = True


def test_context_builds_empty_as_upstream_and_control_defaults():
    from training_hub.callbacks import TrainingHubContext, TrainingHubControl

    ctx = TrainingHubContext()
    assert (ctx.step, ctx.epoch, ctx.loss, ctx.learning_rate, ctx.is_main_process, ctx.output_dir, ctx.metrics,
            ctx.control) == (0, 0, None, None, True, "", {}, None)
    assert TrainingHubContext(42, 3, 0.5).loss == 0.5  # upstream's positional order
    assert TrainingHubContext().metrics is not TrainingHubContext().metrics
    control = TrainingHubControl()
    assert (control.should_save, control.should_training_stop) == (False, False)


def test_control_saves_and_stops_native(tiny_model_dir, chat_path, tmp_path):
    from training_hub import sft

    recorder, out = Recorder(), tmp_path / "sft"
    result = sft(str(tiny_model_dir), str(chat_path), str(out), callbacks=[Steering(), recorder], max_seq_len=256,
                 effective_batch_size=2, learning_rate=1e-3, disable_progress_bar=True)  # 8 steps planned
    assert result.status == "success" and result.metrics["steps"] == 2
    assert result.metrics["stopped_by"] == "callback"
    saves = [Path(e[2]).name for e in recorder.events if e[0] == "save"]
    assert saves == ["samples_2", "samples_4"]  # asked for after step 1, then the final one at the stop
    assert result.checkpoint_path.endswith("samples_4")


def test_control_saves_and_stops_trl(tiny_model_dir, chat_path, tmp_path):
    pytest.importorskip("trl")
    from training_hub import sft

    recorder, out = Recorder(), tmp_path / "trl"
    result = sft(str(tiny_model_dir), str(chat_path), str(out), backend="trl", callbacks=[Steering(), recorder],
                 max_seq_len=256, max_tokens_per_gpu=2 * 256, effective_batch_size=2, learning_rate=1e-3,
                 disable_progress_bar=True)
    assert result.metrics["steps"] == 2 and result.metrics["stopped_by"] == "callback"
    saves = [Path(e[2]).name for e in recorder.events if e[0] == "save"]
    assert saves[0] == "checkpoint-1" and saves[-1].startswith("samples_")
