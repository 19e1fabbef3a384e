"""User code named in a config (reward and group-filter functions, environments): a built-in name or
``package.module:function``, resolved with an error that names the field and the fix."""

from __future__ import annotations

import importlib
import linecache
import os
import traceback
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
    except Exception as err:  # a syntax error or anything the module raises while it runs: named, not traced
        raise ValueError(f"{what}: {spec!r}: {import_failure(module_name, err)}") from err
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


def import_failure(module_name: str, err: Exception) -> str:
    """Why ``import module_name`` raised ``err``, in one line: the file and line where it failed (a syntax error's
    own place, else the innermost frame in the first file the import ran) and the error, or that the module is not
    there."""
    if isinstance(err, SyntaxError):
        where = f"{err.filename}, line {err.lineno}"
        text = (err.text or "").strip()
        detail = f"{type(err).__name__}: {err.msg}" + (f": {text[:80]!r}" if text else "")
        return f"module {module_name!r} does not compile ({where}): {detail}. Fix the module."
    frames = [(frame.f_code.co_filename, line) for frame, line in traceback.walk_tb(err.__traceback__)]
    machinery = (os.path.dirname(importlib.__file__) + os.sep, "<frozen")  # importlib's own frames, then the module's
    user = [(f, n) for f, n in frames if f != __file__ and not f.startswith(machinery)]
    if not user:  # nothing of the module ran: it is not there (or is a binary extension that does not load)
        return (f"module {module_name!r} could not be imported ({type(err).__name__}: {err}). Install the package "
                "or start rlfleet in the module's directory (or add that to PYTHONPATH; on a cluster of several nodes "
                "ship it with the job's working_dir), or fix the module name.")
    file = user[0][0]  # the module (or the package above it) that the import ran
    line = [n for f, n in user if f == file][-1]
    text = linecache.getline(file, line).strip()
    return (f"module {module_name!r} raised while it was imported ({file}, line {line}"
            + (f": {text[:80]!r}" if text else "") + f"): {type(err).__name__}: {err}. Fix the module (or install what "
            "it imports); --debug shows the traceback.")
