"""Parameter declarations: shared groups and the helpers that derive everything else from them."""

from training_hub.config.declare import (
    DeclaredConfig,
    ParameterError,
    ParamSpec,
    closest,
    optional_params,
    param,
    param_specs,
    required_params,
    validate_params,
)

__all__ = [
    "DeclaredConfig", "ParameterError", "ParamSpec", "closest", "optional_params", "param", "param_specs",
    "required_params", "validate_params",
]
