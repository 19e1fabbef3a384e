"""``rlfleet train``'s preflight: everything that can be checked without actors (model, data, reward and filter
functions, LoRA targets, prompt lengths), each problem named with its field and fix; all are reported at once."""

from __future__ import annotations

from pathlib import Path

from rlfleet.cluster.metrics import console
from rlfleet.config import ConfigError, RLFleetConfig


def preflight(cfg: RLFleetConfig):
    """Checks that need files or imports but no actors: model path, dataset, reward and filter functions."""
    from rlfleet.generation.generator import prompt_token_ids, resolve_reward_funcs
    from rlfleet.generation.scoring import BUILTIN_GROUP_FILTERS
    from rlfleet.user_code import resolve_function
    from rlfleet.data import load_prompt_dataset
    from rlfleet.models import load_tokenizer, model_dir_problem, resolve_model_path

    problems, errors = [], []  # errors: the first is the ConfigError's cause (the traceback --debug shows)
    path = resolve_model_path(cfg.model.name_or_path)
    if (path.startswith((".", "/", "~")) or Path(path).suffix) and not Path(path).expanduser().is_dir():
        problems.append(f"model.name_or_path: {path!r} is not a directory; give a model directory, a hub name, "
                        "or builtin:tiny")
    if problem := model_dir_problem(path):  # refused here, not by every engine after its actor started
        problems.append(problem)
    dataset = None
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
    problems += model_problems(cfg)
    eval_dataset = None
    if cfg.logging.eval_steps is not None:
        try:
            eval_dataset = load_eval_dataset(cfg)
        except (ValueError, FileNotFoundError) as err:
            problems.append(str(err))
            errors.append(err)

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
    if dataset is not None and not problems:
        problems += long_prompts(cfg, dataset, load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code),
                                 lambda tokenizer, prompt: prompt_token_ids(tokenizer, prompt, tools))
    if problems:
        raise ConfigError(problems) from (errors[0] if errors else None)
    if cfg.data.eval_split is not None and cfg.logging.eval_steps is None:
        console(f"data.eval_split {cfg.data.eval_split!r} is set but logging.eval_steps is not: no evaluation while "
                "training")
    return dataset, eval_dataset


def load_eval_dataset(cfg: RLFleetConfig):
    """The held-out prompts (``data.eval_split``, the first ``data.max_eval_prompts``, in the split's order);
    errors name ``data.eval_split``."""
    from rlfleet.data import load_prompt_dataset

    data = cfg.data.model_copy(update={"max_prompts": cfg.data.max_eval_prompts, "shuffle": False})
    try:
        return load_prompt_dataset(data, cfg.data.eval_split, seed=cfg.seed)
    except (ValueError, FileNotFoundError) as err:
        message = str(err).removeprefix("data.split: ").removeprefix("data.dataset: ")
        raise ValueError(f"data.eval_split: {cfg.data.eval_split!r} cannot be loaded (used by logging.eval_steps): "
                         f"{message}") from None


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
