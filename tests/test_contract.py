"""Contract suite: runs over every registered (algorithm, backend) pair, so new ones are checked for free."""

from __future__ import annotations

import pytest

from training_hub import AlgorithmRegistry, Availability
from training_hub.config.declare import ParameterError, param_specs, validate_params
from training_hub.registry import backend_availability

PAIRS = [(a, b) for a in AlgorithmRegistry.list_algorithms() for b in AlgorithmRegistry.list_backends(a)]
ALGOS = AlgorithmRegistry.list_algorithms()
CORE_REQUIRED = {"model_path", "data_path", "ckpt_output_dir"}


SAMPLE_VALUES = {str: "/tmp/x", float: 0.5, int: 1, bool: True}


def required_values(config_class) -> dict:
    """A valid value for every required parameter, from its declared type."""
    return {name: SAMPLE_VALUES[spec.type] for name, spec in param_specs(config_class).items() if spec.required}


def test_pairs_exist():
    assert ("sft", "native") in PAIRS


@pytest.mark.parametrize("algo,backend", PAIRS)
def test_availability_is_reported(algo, backend):
    status = backend_availability(AlgorithmRegistry.get_backend(algo, backend))
    assert isinstance(status, Availability)
    assert status.ok or status.reason, "an unavailable backend must say why"


@pytest.mark.parametrize("algo", ALGOS)
def test_declaration_round_trip(algo):
    algorithm_class = AlgorithmRegistry.get_algorithm(algo)
    config_class = algorithm_class.config_class
    instance = algorithm_class(backend=None)
    required, optional = instance.get_required_params(), instance.get_optional_params()
    in_memory = {"data_path"} if "tasks" in param_specs(config_class) else set()  # GRPO: rows as data_path or tasks
    assert CORE_REQUIRED - in_memory <= set(required)
    assert not set(required) & set(optional)
    assert set(required) | set(optional) == set(param_specs(config_class))
    for spec in param_specs(config_class).values():
        assert spec.doc, f"{algo}.{spec.name} has no doc"
    config = validate_params(config_class, {**required_values(config_class),
                                            **({"data_path": "train.jsonl"} if in_memory else {})})
    again = validate_params(config_class, config.to_dict())
    assert again == config
    from training_hub.callbacks import algorithm_of

    assert algorithm_of(config) == algo  # what callbacks and loggers see as ctx.algorithm
    for name, spec in param_specs(config_class).items():
        if not spec.required and name not in in_memory:
            assert getattr(config, name) == spec.default


@pytest.mark.parametrize("algo", ALGOS)
def test_unknown_and_missing_keys_rejected(algo):
    algorithm_class = AlgorithmRegistry.get_algorithm(algo)
    config_class = algorithm_class.config_class
    params = required_values(config_class)
    missing = sorted(params)[0]
    del params[missing]
    params["learning_rat"] = 1e-4
    with pytest.raises(ParameterError) as info:
        algorithm_class(backend=None).validate(params)
    assert f"{missing}: required" in str(info.value)
    assert "learning_rat: unknown parameter; did you mean 'learning_rate'?" in str(info.value)
