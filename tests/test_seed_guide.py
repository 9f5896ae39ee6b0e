"""The 'Extending the Framework' guide is our contract: its code samples run here unchanged.

The samples are read out of the guide itself (``../shared/seed``), not retyped, so the test follows the text.
"""

from __future__ import annotations

import inspect
import re
import sys
import textwrap
from abc import ABC, abstractmethod

import pytest

from conftest import SEED_GUIDE

pytestmark = pytest.mark.skipif(not SEED_GUIDE.exists(), reason=f"seed guide not found at {SEED_GUIDE}")


def guide_blocks(language: str = "python") -> list[str]:
    text = SEED_GUIDE.read_text(encoding="utf-8")
    return [textwrap.dedent(b) for b in re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)]


def block_with(marker: str) -> str:
    found = [b for b in guide_blocks() if marker in b]
    assert len(found) == 1, f"expected exactly one sample containing {marker!r}, found {len(found)}"
    return found[0]


def run(code: str, namespace: dict) -> dict:
    exec(compile(code, str(SEED_GUIDE), "exec"), namespace)
    return namespace


def test_interface_illustrations_match_our_abcs():
    """The guide shows Backend/Algorithm interfaces; ours have exactly those abstract methods and signatures."""
    from training_hub import Algorithm, Backend

    for ours, marker in ((Backend, "class Backend(ABC)"), (Algorithm, "class Algorithm(ABC)")):
        shown = run(block_with(marker), {"ABC": ABC, "abstractmethod": abstractmethod})[ours.__name__]
        assert ours.__abstractmethods__ == shown.__abstractmethods__
        for name in shown.__abstractmethods__:
            assert inspect.signature(getattr(ours, name)) == inspect.signature(getattr(shown, name))


def test_custom_backend_sample(clean_registry, tmp_path, monkeypatch, capsys):
    """Steps 2-4 of 'Creating Custom Backends', verbatim, with a real `my_framework.train` to call."""
    framework = tmp_path / "my_framework"
    framework.mkdir()
    (framework / "__init__.py").write_text("")
    (framework / "train.py").write_text(
        "import sys, pathlib\nargs = dict(zip(sys.argv[1::2], sys.argv[2::2]))\n"
        "pathlib.Path(args['--output']).mkdir(parents=True, exist_ok=True)\n"
        "pathlib.Path(args['--output'], 'args.txt').write_text(repr(args))\nprint('trained', args['--epochs'])\n")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python").symlink_to(sys.executable)
    monkeypatch.setenv("PATH", f"{bindir}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.chdir(tmp_path)

    ns = run(block_with("class MyCustomBackend(Backend)"), {})
    run(block_with('register_backend("sft", "my_backend", MyCustomBackend)'), ns)
    assert "my_backend" in capsys.readouterr().out
    ns = run(block_with('create_algorithm("sft", backend_name="my_backend")'), ns)

    assert ns["result"]["status"] == "success"
    assert ns["result"]["output"].strip() == "trained 5"
    written = eval((tmp_path / "output" / "args.txt").read_text())
    assert written == {"--model": "./model", "--data": "./data.jsonl", "--output": "./output", "--epochs": "5",
                       "--lr": str(1e-5)}  # the sample's own fallback: only given parameters are passed


class Recorder:
    calls: list = []


def test_custom_dpo_algorithm_sample(clean_registry):
    """Steps 1-5 of the DPO example: the guide's classes register, replace ours, and are used by its dpo()."""
    ns = run(block_with("class DPOBackend(Backend)"), {})
    ns = run(block_with("class DPOAlgorithm(Algorithm)"), ns)

    class RecordingDPOBackend(ns["DPOBackend"]):
        def execute_training(self, algorithm_params):
            Recorder.calls.append(dict(algorithm_params))
            return {"checkpoint_path": algorithm_params["ckpt_output_dir"]}

    ns = run(block_with('register_backend("dpo", "trl", DPOBackend)'), ns)
    assert clean_registry.get_algorithm("dpo") is ns["DPOAlgorithm"]
    assert clean_registry.get_backend("dpo", "trl") is ns["DPOBackend"]
    clean_registry.register_backend("dpo", "trl", RecordingDPOBackend)  # no TRL run in this contract test
    ns = run(block_with("def dpo("), ns)
    Recorder.calls.clear()
    ns = run(block_with("# Using the convenience function"), ns)
    assert [c["beta"] for c in Recorder.calls] == [0.1, 0.1]
    assert all(c["num_epochs"] == 3 and c["ckpt_output_dir"] == "./dpo_model" for c in Recorder.calls)
    assert ns["result"] == {"checkpoint_path": "./dpo_model"}
    with pytest.raises(ValueError, match="Missing required parameter: model_path"):
        ns["algorithm"].train(data_path="x", ckpt_output_dir="y")


def test_extension_package_sample(clean_registry, tmp_path, monkeypatch):
    """'Packaging and Distribution': the guide's __init__.py, verbatim, registers on import."""
    pkg = tmp_path / "my_extension"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(block_with("# Auto-register on import"))
    (pkg / "algorithm.py").write_text(
        "from training_hub import Algorithm\n\nclass MyAlgorithm(Algorithm):\n"
        "    def __init__(self, backend, **kwargs):\n        self.backend, self.kwargs = backend, kwargs\n"
        "    def train(self, **kwargs):\n        return self.backend.execute_training({**self.kwargs, **kwargs})\n"
        "    def get_required_params(self):\n        return {}\n"
        "    def get_optional_params(self):\n        return {}\n")
    (pkg / "backend.py").write_text(
        "from training_hub import Backend\n\nclass MyBackend(Backend):\n"
        "    def execute_training(self, algorithm_params):\n        return {'status': 'success', **algorithm_params}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_extension", raising=False)
    ns = run(block_with("import my_extension  # Auto-registers"), {})
    assert ns["algo"].train(x=1) == {"status": "success", "x": 1}
    assert type(ns["algo"].backend).__name__ == "MyBackend"


FILLED_GAPS = {
    # "the obvious way": load the pairs with datasets, configure TRL for a short CPU run
    "        # ... data loading logic ...\n":
        "        from datasets import load_dataset\n"
        "        from trl import DPOConfig\n"
        "        dataset = load_dataset('json', data_files=data_path, split='train')\n",
    "            # ... trainer configuration ...\n":
        "            args=DPOConfig(output_dir=output_dir, beta=beta, max_steps=2, per_device_train_batch_size=2,\n"
        "                           learning_rate=1e-3, use_cpu=True, bf16=False, report_to=[], save_strategy='no',\n"
        "                           gradient_checkpointing=False),\n"
        "            train_dataset=dataset,\n"
        "            processing_class=tokenizer,\n",
}


@pytest.mark.slow
def test_dpo_sample_with_its_gaps_filled_trains_with_trl(clean_registry, tmp_path, monkeypatch):
    """The DPO example end to end: the guide's backend (gaps filled) really trains through TRL and replaces ours."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from training_hub.tiny import make_tiny_model

    monkeypatch.chdir(tmp_path)
    make_tiny_model(tmp_path / "base_model")
    pairs = [{"prompt": f"Say {w}.", "chosen": f"{w}.", "rejected": "No."} for w in ("yes", "hello", "ok", "fine")]
    (tmp_path / "preference_data.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))

    backend_code = block_with("class DPOBackend(Backend)")
    for gap, filling in FILLED_GAPS.items():
        assert gap in backend_code, f"the guide's DPO sample no longer has the gap {gap.strip()!r}"
        backend_code = backend_code.replace(gap, filling)
    ns = run(backend_code, {})
    for marker in ("class DPOAlgorithm(Algorithm)", 'register_backend("dpo", "trl", DPOBackend)', "def dpo(",
                   "# Using the convenience function"):
        ns = run(block_with(marker), ns)
    assert clean_registry.get_algorithm("dpo") is ns["DPOAlgorithm"]
    assert ns["result"] == {"checkpoint_path": "./dpo_model"}
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "dpo_model")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base_model")
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), base.parameters()))
