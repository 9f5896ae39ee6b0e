"""Registry semantics beyond the guide: plugins, availability-driven defaults, helpful errors."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest

from training_hub import Algorithm, AlgorithmRegistry, Availability, Backend, create_algorithm, sft


class EchoBackend(Backend):
    def execute_training(self, algorithm_params):
        return {"status": "success", "params": algorithm_params}


class Unavailable(Backend):
    @classmethod
    def is_available(cls):
        return Availability(False, "needs a flux capacitor")

    def execute_training(self, algorithm_params):  # pragma: no cover - must never run
        raise AssertionError("an unavailable backend ran")


def test_register_backend_for_unknown_algorithm_raises(clean_registry):
    with pytest.raises(ValueError, match=r"Unknown algorithm 'sfft'.*Did you mean 'sft'"):
        AlgorithmRegistry.register_backend("sfft", "x", EchoBackend)


def test_unknown_names_list_valid_names_and_closest(clean_registry):
    with pytest.raises(ValueError, match=r"Valid: dpo, embedding_sft, grpo, lora_grpo, lora_sft, osft, sft\. Did you mean 'sft'"):
        AlgorithmRegistry.get_algorithm("stf")
    AlgorithmRegistry.register_backend("sft", "echo", EchoBackend)
    with pytest.raises(ValueError,
                       match=r"Valid: echo, instructlab-training, mini-trainer, native, trl\. Did you mean 'native'"):
        AlgorithmRegistry.get_backend("sft", "natve")


def test_reregistering_replaces_with_warning(clean_registry, caplog):
    AlgorithmRegistry.register_backend("sft", "echo", EchoBackend)
    with caplog.at_level(logging.WARNING, logger="training_hub"):
        AlgorithmRegistry.register_backend("sft", "echo", Unavailable)
    assert AlgorithmRegistry.get_backend("sft", "echo") is Unavailable
    assert "Backend 'echo' of algorithm 'sft'" in caplog.text and "replaced" in caplog.text


def test_convenience_function_sees_late_registration(clean_registry):
    AlgorithmRegistry.register_backend("sft", "late", EchoBackend)
    out = sft("m", "d.jsonl", "out", backend="late", learning_rate=1, num_epochs=2)
    assert out["params"] == {"model_path": "m", "data_path": "d.jsonl", "ckpt_output_dir": "out",
                             "learning_rate": 1.0, "num_epochs": 2}
    assert isinstance(out["params"]["learning_rate"], float)


def test_one_error_lists_every_mistake(clean_registry):
    AlgorithmRegistry.register_backend("sft", "echo", EchoBackend)
    with pytest.raises(ValueError) as info:
        sft(data_path=3, ckpt_output_dir="o", backend="echo", learning_rate=0, num_epoch=2,
            lr_scheduler="cosin", max_seq_len=-5, effective_batch_size=2.5)
    text = str(info.value)
    for expected in ("model_path: required", "data_path: expected str", "learning_rate: must be > 0",
                     "num_epoch: unknown parameter; did you mean 'num_epochs'",
                     "lr_scheduler: expected", "did you mean 'cosine'", "max_seq_len: must be > 0",
                     "effective_batch_size: expected int"):
        assert expected in text
    assert "7 problem(s)" in text


def test_cross_field_checks(clean_registry):
    AlgorithmRegistry.register_backend("sft", "echo", EchoBackend)
    with pytest.raises(ValueError, match="max_tokens_per_gpu: 100 is below max_seq_len 512"):
        sft("m", "d", "o", backend="echo", max_seq_len=512, max_tokens_per_gpu=100)
    with pytest.raises(ValueError, match="validation_split: give either"):
        sft("m", "d", "o", backend="echo", validation_data_path="v.jsonl", validation_split=0.1)


def test_default_backend_follows_preference_and_availability(clean_registry):
    class Algo(Algorithm):
        backend_preference = ("fancy", "plain")

        def __init__(self, backend, **kw):
            self.backend = backend

        def train(self, **kw):
            return self.backend.execute_training(kw)

        def get_required_params(self):
            return {}

        def get_optional_params(self):
            return {}

    AlgorithmRegistry.register_algorithm("algo", Algo)
    AlgorithmRegistry.register_backend("algo", "plain", EchoBackend)
    AlgorithmRegistry.register_backend("algo", "fancy", Unavailable)
    assert type(create_algorithm("algo").backend) is EchoBackend
    AlgorithmRegistry.register_backend("algo", "plain", Unavailable)
    with pytest.raises(RuntimeError, match=r"(?s)fancy: needs a flux capacitor.*plain: needs a flux capacitor"):
        create_algorithm("algo")


def test_third_party_availability_answers():
    from training_hub.registry import backend_availability

    class Str(Backend):
        execute_training = EchoBackend.execute_training
        is_available = classmethod(lambda cls: "no GPU")

    class No(Backend):
        execute_training = EchoBackend.execute_training
        is_available = classmethod(lambda cls: False)

    class Plain:  # does not even subclass Backend: counts as available
        pass

    assert backend_availability(Str) == Availability(False, "no GPU")
    assert not backend_availability(No) and backend_availability(No).reason
    assert backend_availability(Plain)


def test_explicit_unavailable_backend_says_why_and_what_can(clean_registry):
    AlgorithmRegistry.register_backend("sft", "broken", Unavailable)
    with pytest.raises(RuntimeError, match=r"cannot run here: needs a flux capacitor\. Backends that can: native, trl"):
        sft("m", "d", "o", backend="broken")


# ------------------------------------------------------------------------------------------------
# entry-point plugins: a real (installed-layout) distribution on sys.path, never imported by the user


def make_distribution(root, name: str, module_code: str, entry_value: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(textwrap.dedent(module_code))
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[training_hub.plugins]\n{name} = {entry_value}\n")


PLUGIN_MODULE = """
from training_hub import AlgorithmRegistry, Backend
from training_hub.algorithms.sft import SFTAlgorithm

class PluginBackend(Backend):
    def execute_training(self, algorithm_params):
        return {"status": "success", "by": __name__}

def register():
    AlgorithmRegistry.register_algorithm("{algo}", SFTAlgorithm)
    AlgorithmRegistry.register_backend("{algo}", "plugged", PluginBackend)
"""


def run_python(code: str, path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(path)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=120)


def test_entry_point_plugins_load_without_import(tmp_path):
    make_distribution(tmp_path, "th_plugin_mod", PLUGIN_MODULE.replace("{algo}", "modalgo") + "register()\n",
                      "th_plugin_mod")
    make_distribution(tmp_path, "th_plugin_call", PLUGIN_MODULE.replace("{algo}", "callalgo"),
                      "th_plugin_call:register")
    make_distribution(tmp_path, "th_plugin_bad", "raise ImportError('missing dependency xyz')\n", "th_plugin_bad")
    proc = run_python("""
        import sys, warnings
        warnings.simplefilter("always")
        from training_hub import AlgorithmRegistry, create_algorithm
        assert "th_plugin_mod" not in sys.modules
        algos = AlgorithmRegistry.list_algorithms()
        print(sorted(algos))
        print(create_algorithm("callalgo").train(model_path="m", data_path="d", ckpt_output_dir="o"))
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "'callalgo', 'dpo', 'embedding_sft', 'grpo', 'lora_grpo', 'lora_sft', 'modalgo', 'osft', 'sft'" \
        in proc.stdout
    assert "'by': 'th_plugin_call'" in proc.stdout
    assert "training_hub plugin 'th_plugin_bad' (th_plugin_bad) failed to load: ImportError: missing dependency xyz" \
        in proc.stderr


def test_import_is_cheap():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c",
                           "import sys, training_hub; heavy = [m for m in ('torch', 'transformers', 'datasets', "
                           "'trl', 'peft', 'numpy') if m in sys.modules]; assert not heavy, heavy"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [ln for ln in proc.stderr.splitlines() if ln.rstrip().endswith("| training_hub")][0]
    cumulative_us = int(line.split("|")[1])
    assert cumulative_us < 300_000, f"import training_hub took {cumulative_us / 1e3:.0f} ms"


class KnobBackend(EchoBackend):
    @classmethod
    def passthrough_params(cls):
        return {"my_knob"}


def test_backend_options_reach_that_backend_only(clean_registry):
    from training_hub.config.declare import ParameterError

    AlgorithmRegistry.register_backend("sft", "knob", KnobBackend)
    result = sft("m", "d.jsonl", "out", backend="knob", my_knob=3, learning_rate=1e-4)
    assert result["params"] == {"model_path": "m", "data_path": "d.jsonl", "ckpt_output_dir": "out",
                                "learning_rate": 1e-4, "my_knob": 3}
    with pytest.raises(ParameterError, match="my_knob: not a training_hub parameter.*backend='knob'"):
        sft("m", "d.jsonl", "out", backend="native", my_knob=3)
