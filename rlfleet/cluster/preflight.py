"""The checks before a job starts: everything that can be checked without actors (model, data, the evaluation
split, reward and filter functions, environments, LoRA targets, prompt lengths), each problem named with its field
and fix; all are reported at once. ``rlfleet train`` and ``rlfleet dpo`` run them before Ray starts, and
``rlfleet config`` runs them without fetching anything from the hub (:func:`hub_names`: left to the job)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from rlfleet.cluster.metrics import console
from rlfleet.config import ConfigError, RLFleetConfig


def on_hub(name: str) -> bool:
    """A dataset or model named on the hub (neither built-in nor a local path)."""
    from rlfleet.data import BUILTIN_PREFIX, is_local_file

    return not name.startswith(BUILTIN_PREFIX) and not is_local_file(name)


def hub_names(cfg: RLFleetConfig) -> list[str]:
    """The model and datasets of ``cfg`` named on the hub: what the checks with ``fetch=False`` leave to the job."""
    data = cfg.data
    named = [("model.name_or_path", cfg.model.name_or_path), ("data.dataset", data.dataset)]
    if data.eval_dataset is not None:
        named.append(("data.eval_dataset", data.eval_dataset))
    return [f"{field} {name!r}" for field, name in named if on_hub(name)]


def preflight(cfg: RLFleetConfig, fetch: bool = True):
    """``rlfleet train``'s checks that need files or imports but no actors: model path, dataset, evaluation split,
    environment, reward and filter functions, prompt lengths. ``fetch=False``: a model or dataset named on the hub
    is not downloaded, nor are the checks that need it run. Returns the training and evaluation datasets (None where
    not loaded); raises :class:`ConfigError` listing every problem."""
    from rlfleet.generation.generator import prompt_token_ids, resolve_reward_funcs
    from rlfleet.generation.scoring import BUILTIN_GROUP_FILTERS
    from rlfleet.user_code import resolve_function
    from rlfleet.data import eval_data, eval_on_train_problem, load_prompt_dataset
    from rlfleet.models import load_tokenizer, model_dir_problem, resolve_model_path

    problems, errors = [], []  # errors: the first is the ConfigError's cause (the traceback --debug shows)
    path = resolve_model_path(cfg.model.name_or_path)
    local = path.startswith((".", "/", "~")) or Path(path).exists()  # not its suffix: Qwen/Qwen3-0.6B is a hub name
    if local and not Path(path).expanduser().is_dir():
        problems.append(f"model.name_or_path: {path!r} is not a directory; give a model directory, a hub name, "
                        "or builtin:tiny")
    if problem := model_dir_problem(path):  # refused here, not by every engine after its actor started
        problems.append(problem)
    dataset = None
    if fetch or not on_hub(cfg.data.dataset):
        try:
            dataset = load_prompt_dataset(cfg.data, cfg.data.split, seed=cfg.seed)
        except (ValueError, FileNotFoundError) as err:
            problems.append(str(err) if str(err).startswith("data.") else f"data.dataset: {err}")
            errors.append(err)
    alg = cfg.algorithm
    tools = None
    if alg.environment is not None:
        from rlfleet.environments import make_environment

        try:
            tools = getattr(make_environment(alg.environment, alg.environment_kwargs), "tools", None)
        except ValueError as err:
            problems.append(str(err))
            errors.append(err)
        if dataset is not None and len(dataset) and not isinstance(dataset[0]["prompt"], list):
            problems.append(f"algorithm.environment: {alg.environment!r} needs conversational prompts (lists of "
                            f"{{'role', 'content'}} messages), and data.dataset {cfg.data.dataset!r} has plain "
                            "strings; set data.system_prompt (\"\" for none) to make each string a user message")
    model_local = fetch or not on_hub(cfg.model.name_or_path)
    problems += model_problems(cfg) + kv_cache_problems(cfg) + packing_problems(cfg) if model_local else []
    eval_dataset = None
    evaluated = fetch or not on_hub(eval_data(cfg.data).dataset)
    if cfg.logging.eval_steps is not None and evaluated:
        try:
            eval_dataset = load_eval_dataset(cfg)
        except (ValueError, FileNotFoundError) as err:
            problems.append(str(err))
            errors.append(err)
        if eval_dataset is not None and dataset is not None and (problem := eval_on_train_problem(cfg.data)):
            problems.append(problem)

    def rewards_ready() -> None:  # a reward function may declare preflight(), raising ValueError (the code sandbox)
        for func in resolve_reward_funcs(alg, cfg.data):
            if callable(check := getattr(func, "preflight", None)):
                check()

    checks = [rewards_ready]
    if alg.group_filter_func is not None:
        checks.append(lambda: resolve_function(alg.group_filter_func, BUILTIN_GROUP_FILTERS,
                                               "algorithm.group_filter_func"))
    for check in checks:
        try:
            check()
        except ValueError as err:
            problems.append(str(err))
            errors.append(err)
    if dataset is not None and model_local and not problems:
        problems += long_prompts(cfg, dataset, load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code),
                                 lambda tokenizer, prompt: prompt_token_ids(tokenizer, prompt, tools))
    if problems:
        raise ConfigError(problems) from (errors[0] if errors else None)
    unused = next((f for f in ("eval_split", "eval_dataset") if getattr(cfg.data, f) is not None), None)
    if fetch and unused is not None and cfg.logging.eval_steps is None:
        console(f"data.{unused} {getattr(cfg.data, unused)!r} is set but logging.eval_steps is not: no evaluation "
                "while training")
    return dataset, eval_dataset


def load_eval_dataset(cfg: RLFleetConfig):
    """The evaluation prompts (:func:`rlfleet.data.eval_data`: ``data.eval_split`` of ``data.eval_dataset`` or of
    ``data.dataset``, the first ``data.max_eval_prompts``, in order); errors name those fields."""
    from rlfleet.data import eval_data, eval_load_problem, load_prompt_dataset

    data = eval_data(cfg.data)
    try:
        return load_prompt_dataset(data, data.split, seed=cfg.seed)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(eval_load_problem(cfg.data, err)) from None


def preflight_dpo(cfg: RLFleetConfig, fetch: bool = True):
    """``rlfleet dpo``'s checks: the tokenized training split and evaluation split (None without one); raises
    :class:`ConfigError` listing every problem. ``fetch=False``: nothing named on the hub is loaded, and the splits
    are loaded but not tokenized where the model is."""
    from rlfleet.data import eval_data, eval_load_problem, eval_on_train_problem
    from rlfleet.dpo.data import load_preference_dataset, tokenize_preferences
    from rlfleet.models import load_tokenizer, model_dir_problem, resolve_model_path

    if problem := model_dir_problem(resolve_model_path(cfg.model.name_or_path)):  # before the learner's actor starts
        raise ConfigError([problem])
    tokenizer = None
    if fetch or not on_hub(cfg.model.name_or_path):
        try:
            tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
        except (OSError, ValueError) as err:
            raise ConfigError([f"model.name_or_path: cannot load a tokenizer from {cfg.model.name_or_path!r}: "
                               f"{err}"])
    problems, splits = (model_problems(cfg) + packing_problems(cfg) if tokenizer is not None else []), []
    data = cfg.data
    evaluated = data.eval_split is not None or data.eval_dataset is not None
    for field, part in [("data.split", data), *([("data.eval_split", eval_data(data))] if evaluated else [])]:
        if not fetch and on_hub(part.dataset):
            splits.append(None)
            continue
        try:
            raw = load_preference_dataset(part, part.split)
            splits.append(raw if tokenizer is None else
                          tokenize_preferences(raw, tokenizer, cfg.dpo.max_length, f"{field} {part.split!r}"))
        except (ValueError, FileNotFoundError) as err:
            problems.append(eval_load_problem(data, err) if part is not data else str(err))
            splits.append(None)
    if evaluated and None not in splits and not problems and (problem := eval_on_train_problem(data)):
        problems.append(problem)
    if problems:
        raise ConfigError(problems)
    return splits[0], (splits[1] if evaluated else None)


def model_problems(cfg: RLFleetConfig) -> list[str]:
    """``model.lora`` on this model: a rank the engines serve, target modules the model has (its config is read,
    not its weights)."""
    if cfg.model.lora is None:
        return []
    from rlfleet.cluster.memory import meta_model
    from rlfleet.lora import lora_problems

    try:
        names = [name for name, _ in meta_model(cfg.model.name_or_path, cfg.model.trust_remote_code).named_modules()]
    except (OSError, ValueError):  # no model config to read: model.name_or_path's own check says so
        return []
    return lora_problems(cfg.model.lora, names)


def packing_problems(cfg: RLFleetConfig) -> list[str]:
    """``learner.pack_sequences`` on a model whose attention does not keep packed sequences apart
    (:func:`~rlfleet.learner.logprobs.check_packing`), checked on a miniature of the model (:func:`miniature_model`)
    so that the job is refused before any actor starts. A model whose miniature cannot be built is left to the
    learner, which checks the real model when it starts."""
    if not cfg.learner.pack_sequences:
        return []
    from rlfleet.learner.logprobs import check_packing

    try:
        model = miniature_model(cfg.model.name_or_path, cfg.model.trust_remote_code)
    except Exception:  # noqa: BLE001 - any architecture's config: the learner's own check at start still runs
        return []
    if model is None:
        return []
    try:
        check_packing(model)
    except ValueError as err:
        return [str(err)]
    except Exception:  # noqa: BLE001 - the miniature's widths do not suit this architecture: as above
        return []
    return []


MINIATURE_PARAMS = 20_000_000  # above this the miniature is not built (the learner checks at start)


def miniature_model(name_or_path: str, trust_remote_code: bool = False):
    """The model's architecture (its own modelling code, remote code included, so its attention and masks) with one
    layer, heads of width 8, a feed-forward width of 16 and a vocabulary of 64, in float32 with random weights; None
    where that would still hold more than :data:`MINIATURE_PARAMS` parameters."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlfleet.models import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    text = getattr(config, "text_config", None) or config  # multimodal configs keep the decoder's apart
    heads = getattr(text, "num_attention_heads", None)
    small = {"num_hidden_layers": 1, "vocab_size": 64, "intermediate_size": 16, "head_dim": 8,
             "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16,
             "hidden_size": heads * 8 if isinstance(heads, int) else None}
    for key, value in small.items():
        if value is not None and isinstance(getattr(text, key, None), int):
            setattr(text, key, value)
    if isinstance(getattr(text, "layer_types", None), list):  # one entry per layer
        text.layer_types = text.layer_types[:1]
    if isinstance(getattr(text, "pad_token_id", None), int) and text.pad_token_id >= text.vocab_size:
        text.pad_token_id = None  # the embedding's padding row must lie inside the small vocabulary
    with torch.device("meta"):
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(
            config, trust_remote_code=trust_remote_code).parameters())
    if size > MINIATURE_PARAMS:
        return None
    return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                            dtype=torch.float32).eval()


def kv_cache_problems(cfg: RLFleetConfig) -> list[str]:
    """A CPU engine's KV cache (``generation.kv_cache_space_gib``) holds one sequence at ``model.max_model_len``:
    vLLM refuses to start otherwise, in every generation actor."""
    from rlfleet.models import engine_dtype, kv_bytes_per_token

    c = cfg.cluster
    if (c.learner_num_gpus if c.colocate else c.generator_num_gpus) or os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return []  # on GPU vLLM sizes the cache from gpu_memory_utilization; the environment's size is the user's
    try:
        dtype = engine_dtype(cfg.model, cfg.generation, on_gpu=False)
        per_token = kv_bytes_per_token(cfg.model.name_or_path, dtype.itemsize, cfg.model.trust_remote_code)
    except (OSError, ValueError):  # no model config to read: model.name_or_path's own check says so
        return []
    gib = cfg.generation.kv_cache_space_gib
    holds, need = int(gib * 2**30 // per_token), cfg.model.max_model_len
    if holds >= need:
        return []
    return [f"generation.kv_cache_space_gib={gib:g} holds {holds} tokens of this model ({per_token / 2**10:g} KiB "
            f"a token in {str(dtype).removeprefix('torch.')}), fewer than one sequence at model.max_model_len={need}; "
            f"raise it to at least {math.ceil(need * per_token / 2**30 * 1000) / 1000:g} or lower model.max_model_len"]


def long_prompts(cfg: RLFleetConfig, dataset, tokenizer, encode, sample: int = 2000) -> list[str]:
    """The first prompt (of the first ``sample``) that leaves no room for a full completion, as a problem."""
    room = cfg.model.max_model_len - cfg.generation.max_completion_length
    for i, prompt in enumerate(dataset.select(range(min(len(dataset), sample)))["prompt"]):
        n = len(encode(tokenizer, prompt))
        if n > room:
            return [f"data.dataset: prompt {i} has {n} tokens, more than model.max_model_len "
                    f"({cfg.model.max_model_len}) - generation.max_completion_length "
                    f"({cfg.generation.max_completion_length}) = {room}; raise model.max_model_len, lower "
                    "generation.max_completion_length, or filter out long prompts"]
    return []
