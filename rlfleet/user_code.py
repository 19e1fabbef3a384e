"""User code named in a config (reward and group-filter functions, environments): a built-in name or
``package.module:function``, resolved with an error that names the field and the fix."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def resolve_function(spec: str, builtins: dict[str, Callable], what: str) -> Callable:
    """A built-in name (a key of ``builtins``) or ``"package.module:function"`` -> the callable.

    ``what`` names the config field for the error message (e.g. ``"algorithm.reward_funcs[0]"``). Raises
    ``ValueError`` naming the field, the spec, the reason and the fix.
    """
    if spec in builtins:
        return builtins[spec]
    known = ", ".join(repr(name) for name in sorted(builtins)) or "none"
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(
            f"{what}: {spec!r} is not a built-in (known: {known}) and not of the form 'package.module:function'. "
            "Use a built-in name or point at an importable function, e.g. 'my_rewards.math:exact_match'."
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"{what}: {spec!r}: module {module_name!r} could not be imported ({type(err).__name__}: {err}). "
            "Install the package or add its directory to PYTHONPATH (on every Ray node), or fix the module name."
        ) from err
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ValueError(
                f"{what}: {spec!r}: attribute {part!r} is missing from {getattr(obj, '__name__', module_name)!r}. "
                "Check the function name after ':'."
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(
            f"{what}: {spec!r} resolves to a {type(obj).__name__}, which is not callable. "
            "Point at a function, e.g. 'package.module:function'."
        )
    return obj
