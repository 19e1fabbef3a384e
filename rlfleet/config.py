"""The one configuration of an rlfleet run.

A run is described by :class:`RLFleetConfig`, made of sections (``model``, ``data``, ``generation``,
``algorithm``, ``replay``, ``learner``, ``dpo``, ``cluster``, ``checkpoint``, ``logging``). Values come from,
in increasing precedence: the fields' defaults, a YAML file, and dotted command-line overrides
(``learner.learning_rate=1e-5 generation.num_generations=8``).

Every section forbids unknown keys, so a typo fails loudly. Field names follow TRL where the concept is TRL's
(``num_generations``, ``loss_type``, ``epsilon``, ``beta``, ``num_remains_in_group``, BEMA's ``update_freq`` ...),
with TRL's defaults unless the field's doc says why not. Cross-field checks run at load time, before any actor
starts, and name the field, the value and the fix.

This module holds the loading and re-exports the rest: the sections (:mod:`rlfleet.config_sections`), the
``algorithm`` section's variants, a union on ``algorithm.name`` (:mod:`rlfleet.config_algorithm`), and the root with
its cross-field checks (:mod:`rlfleet.config_root`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Tag, ValidationError

from rlfleet.config_algorithm import (ALGORITHMS, Algorithm, AlgorithmBase, AlgorithmConfig, GRPOConfig,
                                      ImportanceSamplingLevel, LossType, OnlineDPOConfig, RolloutCorrection,
                                      RolloutCorrectionLevel)
from rlfleet.config_root import (REMOVED_FIELDS, RLFleetConfig, cross_field_problems, online_dpo_problems,
                                 removed_field_problems, surrogate_problems)
from rlfleet.config_sections import (BEMAConfig, CheckpointConfig, ClusterConfig, DataConfig, DPOConfig,
                                     GenerationConfig, GeneratorRange, LearnerConfig, LoggingConfig, LoraConfig,
                                     ModelConfig, ReplayConfig, Section, UserPath)

__all__ = ["ALGORITHMS", "REMOVED_FIELDS", "Algorithm", "AlgorithmBase", "AlgorithmConfig", "BEMAConfig",
           "CheckpointConfig", "ClusterConfig", "ConfigError", "DPOConfig", "DataConfig", "GRPOConfig",
           "GenerationConfig", "GeneratorRange", "ImportanceSamplingLevel", "LearnerConfig", "LoggingConfig",
           "LoraConfig", "LossType", "ModelConfig", "OnlineDPOConfig", "RLFleetConfig", "ReplayConfig",
           "RolloutCorrection", "RolloutCorrectionLevel", "Section", "UserPath", "config_from_dict",
           "cross_field_problems", "dump_config", "load_config", "online_dpo_problems", "parse_overrides",
           "removed_field_problems", "surrogate_problems"]


class ConfigError(ValueError):
    """An invalid configuration. ``str(err)`` lists one problem per line as ``field.path: message``."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[1, 2]"]`` -> ``{"a": {"b": 1}, "c": [1, 2]}``; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError([f"override {item!r}: expected key=value, e.g. learner.learning_rate=1e-5"])
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"override {item!r}: {part} is set to a value and used as a section"])
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return tree


# Short spellings accepted in files and overrides, rewritten to the field's name before merging.
ALIASES = {("learner", "lr"): "learning_rate"}


def _canonical(data: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for section, value in data.items():
        if isinstance(value, dict):
            value = {ALIASES.get((section, k), k): v for k, v in value.items()}
        out[section] = value
    return out


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _field_path(loc: tuple[int | str, ...]) -> tuple[str, bool]:
    """An error's ``loc`` as a dotted field path, without the label pydantic puts after a field whose type is a union
    to say which member it tried (``cluster.num_generators.constrained-int``, ``algorithm.online_dpo.beta``); and
    whether the error is about that member as a whole rather than a field inside it."""
    parts, model, whole_member, i = [], RLFleetConfig, False, 0
    while i < len(loc):
        part, i = loc[i], i + 1
        parts.append(str(part))
        field = model.model_fields.get(part) if model is not None and isinstance(part, str) else None
        if field is None:
            model = None
            continue
        union = get_origin(field.annotation) in (Union, UnionType)
        types = [t for t in get_args(field.annotation) if t is not type(None)] if union else [field.annotation]
        models = {}  # a member model by its label: its Tag in a discriminated union, else its class name
        for t in types:
            member, tags = (get_args(t)[0], get_args(t)[1:]) if get_origin(t) is Annotated else (t, ())
            if isinstance(member, type) and issubclass(member, BaseModel):
                label = next((m.tag for m in tags if isinstance(m, Tag)), member.__name__)
                models[label] = member
        model = next(iter(models.values())) if len(models) == 1 else None
        if len(types) > 1:  # skip the member's label
            model = models.get(loc[i]) if i < len(loc) and isinstance(loc[i], str) else model
            i += 1
            whole_member = i == len(loc)
    return ".".join(parts), whole_member


def _algorithm_owning(loc: tuple[int | str, ...]) -> str | None:
    """For an unknown key under ``algorithm`` (loc ``("algorithm", variant, key)``): the other variant that has it."""
    if len(loc) != 3 or loc[0] != "algorithm":
        return None
    return next((name for name, cls in ALGORITHMS.items() if name != loc[1] and loc[2] in cls.model_fields), None)


def _format_validation_error(err: ValidationError) -> list[str]:
    problems, located, other_type = [], [], {}
    for e in err.errors():
        loc, whole_member = _field_path(e["loc"])
        if whole_member and (e["type"].endswith(("_type", "_parsing")) or e["type"] == "literal_error"):
            other_type.setdefault(loc, []).append(e)  # a union member of another type: said below if none fits
            continue
        located.append(loc)
        if e["type"] == "value_error":  # our cross-field checks: already "field: message", one per line
            msg = str(e.get("ctx", {}).get("error", e["msg"]))
            problems.extend(line for line in msg.splitlines() if line)
        elif e["type"] == "extra_forbidden" and (owner := _algorithm_owning(e["loc"])):
            name = e["loc"][1]
            problems.append(f"{loc}: a field of algorithm.name {owner}, not of {name}; remove it, or set "
                            f"algorithm.name: {owner}" + (" (online DPO's own knobs are the dpo section's: dpo.beta, "
                            "dpo.bema, dpo.pairs, dpo.min_reward_margin)" if name == "online_dpo" else ""))
        elif e["type"] == "extra_forbidden":
            problems.append(f"{loc}: unknown key (check the spelling; `rlfleet config` prints every known key)")
        elif e["type"] == "union_tag_invalid":
            problems.append(f"{loc}.name: {e['ctx']['tag']!r} is not one of {e['ctx']['expected_tags']}")
        elif e["type"] == "union_tag_not_found":
            got = e.get("input")
            problems.append(f"{loc}.name: {got.get('name')!r} is not one of {', '.join(map(repr, ALGORITHMS))}"
                            if isinstance(got, dict) else
                            f"{loc}: expected a section, e.g. {{name: grpo, ...}} (got {got!r})")
        elif e["type"] == "greater_than_equal":
            n = e["ctx"]["ge"]
            problems.append(f"{loc}: {e['input']!r} is negative; use 0 or more" if n == 0 else
                            f"{loc}: {e['input']!r} is less than {n}; use {n} or more")
        else:
            problems.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    for loc, errors in other_type.items():
        if not any(p == loc or p.startswith(loc + ".") for p in located):  # no member of the union took the value
            ways = [errors[0]["msg"]] + [e["msg"].removeprefix("Input should be ") for e in errors[1:]]
            problems.append(f"{loc}: {'; or '.join(ways)} (got {errors[0].get('input')!r})")
    return problems


def config_from_dict(data: dict[str, Any]) -> RLFleetConfig:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return RLFleetConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RLFleetConfig:
    """Defaults < YAML file at ``path`` < dotted ``overrides``. Raises :class:`ConfigError`."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file {str(p)!r} does not exist; pass the path of a YAML job config"])
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = " ".join(str(x) for x in (getattr(err, "context", None), getattr(err, "problem", None)) if x)
            raise ConfigError([f"config file {str(p)!r}{where}: not valid YAML: {what or err}"]) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError([f"config file {str(p)!r} must hold a mapping of sections, got {type(loaded).__name__}"])
        data = loaded or {}
    return config_from_dict(_merge(_canonical(data), _canonical(parse_overrides(overrides or []))))


def dump_config(cfg: RLFleetConfig) -> str:
    return json.dumps(cfg.model_dump(mode="json"), indent=2)
