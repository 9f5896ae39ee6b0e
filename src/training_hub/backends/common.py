"""What the built-in backends share: they receive the validated, typed config from the algorithm.

A built-in backend still honours the seed guide's contract, ``execute_training(algorithm_params: dict)``, for a
caller that uses it directly: the dict is validated into the typed config there. Through an algorithm
(``sft()``, ``create_algorithm(...).train()``) the call is validated once, in the caller, and arrives through
:meth:`BuiltinBackend.train_config`.

Every "this backend cannot take that" rule is in the backend's ``refusals(config, given)``: the algorithm's default
choice skips a backend that refuses a call, and a named backend raises the same refusals as one ``ParameterError``
before any data, model or output directory is touched.
"""

from __future__ import annotations

import importlib.util
from typing import Any, ClassVar, Dict

from training_hub.config.declare import ParameterError
from training_hub.config.upstream import validated_call
from training_hub.registry import Availability, Backend


def missing_modules(*modules: str) -> list[str]:
    """The importable names among ``modules`` that are not installed (checked without importing them)."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def availability_of(modules: tuple[str, ...], install_hint: str) -> Availability:
    missing = missing_modules(*modules)
    if missing:
        return Availability(False, f"needs {', '.join(missing)} ({install_hint})")
    return Availability(True)


def passthrough_names(backend_cls: type) -> frozenset[str]:
    """The engine options a backend accepts besides the declared parameters (adapter backends; empty for others
    and where the engine is not installed)."""
    names = getattr(backend_cls, "passthrough_params", None)
    if names is None:
        return frozenset()
    try:
        return frozenset(names())
    except Exception:  # a broken or missing engine must not break validation; the backend reports it
        return frozenset()


def qlora_problems() -> list[str]:
    """Why ``load_in_4bit=True`` cannot run on this machine (empty when it can): for every LoRA backend's checks."""
    import torch

    why = []
    if not torch.cuda.is_available():
        why.append("CUDA is not available")
    if importlib.util.find_spec("bitsandbytes") is None:
        why.append("bitsandbytes is not installed (pip install bitsandbytes)")
    if why:
        return [f"load_in_4bit: QLoRA needs CUDA and bitsandbytes, but {' and '.join(why)}; "
                "train without load_in_4bit (plain LoRA) instead"]
    return []


def check_model(config: Any, algorithm: str) -> None:
    """A local ``model_path`` that cannot hold a model fails here, before any data work (``data.model_dir``)."""
    from training_hub.data.model_dir import check_model_dir

    model_path = getattr(config, "model_path", None)
    if model_path:
        # DPO text pairs and embedding_sft's plain texts need no chat template
        chat = algorithm not in ("dpo", "embedding_sft") and not getattr(config, "is_pretraining", False)
        check_model_dir(str(model_path), need_chat_template=chat,
                        trust_remote_code=bool(getattr(config, "trust_remote_code", False)))


def linear_module_names(model_path: str, trust_remote_code: bool = False) -> list[str]:
    """The names (last part) of the model's ``nn.Linear`` modules, read from its config on the meta device: no
    weights are loaded and no memory is used."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear)})


def check_lora_targets(config: Any) -> None:
    """A LoRA ``target_modules`` entry that names no linear layer of the model fails here, before any data work,
    listing the names it could be (PEFT matches a name or the last part of a module's dotted name)."""
    targets = getattr(config, "target_modules", None)
    if not targets or targets == ["all-linear"]:
        return
    from training_hub.config.declare import closest

    names = linear_module_names(str(config.model_path), bool(getattr(config, "trust_remote_code", False)))
    unknown = [t for t in targets if t not in names and t.rsplit(".", 1)[-1] not in names]
    if unknown:
        hints = "; ".join(f"{t!r}: did you mean {closest(t, names)!r}?" for t in unknown if closest(t, names))
        raise ParameterError("lora_sft()", [f"target_modules: {', '.join(map(repr, unknown))} name(s) no linear layer "
                                            f"of {config.model_path}; its linear layers are {', '.join(names)} (or "
                                            f"'all-linear')" + (f". {hints}" if hints else "")])


def add_lora_models(result: Any, config: Any) -> Any:
    """``result["model"]`` and ``result["tokenizer"]``, as upstream ``lora_sft()``'s result has them, loaded from
    disk on first access (a caller who never asks loads nothing): with ``merge=True`` the merged checkpoint, else
    the base model with the trained adapter (a ``peft.PeftModel``); the tokenizer saved with it. On the CPU, in the
    stored dtype (``.to("cuda")`` to move it). Nothing is added when no checkpoint was saved."""
    merged = result.extra.get("merged_path")
    path = merged or result.checkpoint_path
    if not path:
        return result
    trust = bool(getattr(config, "trust_remote_code", False))

    def model():
        from transformers import AutoModelForCausalLM

        if merged:
            return AutoModelForCausalLM.from_pretrained(path, dtype="auto", trust_remote_code=trust)
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(str(config.model_path), dtype="auto", trust_remote_code=trust)
        return PeftModel.from_pretrained(base, path)

    def tokenizer():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust)

    result.set_lazy("model", model)
    result.set_lazy("tokenizer", tokenizer)
    return result


def native_only_problems(config: Any) -> list[str]:
    """The settings only our own engine implements, for the refusals of the other backends."""
    problems = []
    if getattr(config, "optimizer_state_dtype", "float32") != "float32":
        problems.append("optimizer_state_dtype: bf16 optimizer states are the native engine's (use backend='native')")
    if getattr(config, "torch_compile", False):
        problems.append("torch_compile: compiling the decoder layers (checked against eager) is the native engine's "
                        "(use backend='native')")
    return problems


class BuiltinBackend(Backend):
    """A backend shipped with training_hub. Subclasses set ``name``/``algorithm``, ``config_class()``,
    ``refusals()`` (what they cannot take) and ``run(config, given, options)`` (the training)."""

    name: ClassVar[str]  # the registered backend name, e.g. "native"
    algorithm: ClassVar[str]
    refusal_hint: ClassVar[str] = ""  # the way out, added to a refusal

    @classmethod
    def config_class(cls) -> type:
        raise NotImplementedError

    @classmethod
    def refusals(cls, config: Any, given: set[str]) -> list[str]:
        """What this backend cannot do with a validated call (empty: it can); ``given``: the names the caller gave."""
        return []

    @classmethod
    def passthrough_params(cls) -> frozenset[str]:
        """Undeclared names (engine options) this backend takes as they are."""
        return frozenset()

    def execute_training(self, algorithm_params: Dict[str, Any]) -> Any:
        """The seed contract, for direct callers: validate the plain dict, then :meth:`train_config`."""
        takes = passthrough_names(type(self))
        options = {k: v for k, v in algorithm_params.items() if k in takes}
        config, names = validated_call(self.config_class(), {k: v for k, v in algorithm_params.items()
                                                             if k not in takes},
                                       what=f"the {self.name} {self.algorithm} backend")
        return self.train_config(config, set(names), options)

    def train_config(self, config: Any, given: set[str], options: Dict[str, Any] | None = None) -> Any:
        """Train a validated call: refuse what this backend cannot do (one error, before any work), then run."""
        problems = self.refusals(config, given)
        if problems:
            raise ParameterError(f"{self.algorithm}() with the {self.name} backend",
                                 problems + ([self.refusal_hint] if self.refusal_hint else []))
        check_model(config, self.algorithm)
        check_lora_targets(config)
        return self.run(config, given, options or {})

    def run(self, config: Any, given: set[str], options: Dict[str, Any]) -> Any:
        raise NotImplementedError
