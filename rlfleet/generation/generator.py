"""The generator: prompt records -> sampled, scored, (GFPO-)filtered groups with advantages. No Ray, no vLLM.

For a batch of records (dataset rows with ``prompt`` and ``prompt_id``), :meth:`Generator.generate`:

1. tokenizes each prompt: conversational prompts through the chat template (``add_generation_prompt=True``),
   standard ones as they are (both without added special tokens, as TRL);
2. samples G = ``num_generations`` completions per prompt with their behaviour log-probs (``Engine.sample``);
3. decodes them (conversational prompts get ``[{"role": "assistant", "content": text}]``, as TRL) and calls each
   reward function with TRL's signature ``f(prompts=..., completions=..., completion_ids=..., **columns)``, prompts
   and the record's other columns repeated once per completion; ``None`` means "not scored by this function";
4. combines them, ``r = nansum_k w_k r_k`` (``scoring.combine_rewards``), laid out ``[num_groups, G]``;
5. GFPO, when ``num_remains_in_group = k`` is set: scores from the group filter
   ``f(group_completions=..., group_rewards=..., completion_lengths=...)`` (``completion_lengths`` only if the
   function accepts it: TRL's filters do not), keeps the top k per group (``scoring.select_top_k``);
6. computes advantages on the kept completions only (``scoring.group_advantages``, ``algorithm.scale_rewards``).
   Truncated completions are kept and count in the statistics (TRL); masking them is the learner's business.

Reward functions run in a worker process beside the generator (:mod:`~rlfleet.generation.reward_worker`; in this
process for a generator built directly, as unit tests do): a call past ``algorithm.reward_timeout_s`` or lost with
a worker that died spoils its groups, as a raising one does, and ``async def`` functions are called per group, side
by side. A reward or filter function that raises, returns the wrong number of values, or returns NaN / inf (a filter
may return -inf: "keep last") spoils the groups it was scoring: they are dropped and counted in ``errors/reward``,
and the error is logged once per function, with its name. A prompt too long for the engine is dropped and counted too.

With an environment (``algorithm.environment``), step 2 samples multi-turn episodes
(:class:`~rlfleet.generation.episodes.EpisodeRunner`): a completion is then the episode after the prompt, the
reward functions receive its messages (the model's and the environment's), GFPO's ``completion_lengths`` count the
model's tokens, and the groups carry a loss mask. A group whose environment failed is dropped and counted in
``errors/env`` (logged once per kind of failure).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, as_completed, wait
from typing import Any, Protocol

import numpy as np

from rlfleet.generation.engine import Completion
from rlfleet.generation.episodes import Episode, EpisodeRunner
from rlfleet.generation.reward_worker import InlineRewards, Outcome, RewardWorker
from rlfleet.generation.scoring import (
    BUILTIN_GROUP_FILTERS,
    combine_rewards,
    group_advantages,
    select_top_k,
)
from rlfleet.user_code import resolve_function
from rlfleet.config import AlgorithmBase, DataConfig, GenerationConfig, RLFleetConfig
from rlfleet.data import builtin_task
from rlfleet.rewards import BUILTIN_REWARDS
from rlfleet.types import Group

logger = logging.getLogger(__name__)
DROPPED = "the groups it was scoring are dropped and counted in errors/reward"


class SamplingEngine(Protocol):
    """What the generator needs from an engine (``rlfleet.generation.engine.Engine``, or a fake in tests)."""

    version: int
    max_model_len: int

    def sample(self, prompt_token_ids: list[list[int]], n: int) -> list[list[Completion]]: ...


def resolve_reward_funcs(algorithm: AlgorithmBase, data: DataConfig) -> list[Callable]:
    """``algorithm.reward_funcs`` as callables; if empty, the built-in task's own reward functions."""
    specs = list(algorithm.reward_funcs)
    if not specs:
        task = builtin_task(data.dataset)
        if task is None:
            raise ValueError(
                f"algorithm.reward_funcs: empty, and data.dataset {data.dataset!r} is not a built-in task with "
                f"default rewards; name at least one ({', '.join(BUILTIN_REWARDS)} or 'package.module:function')"
            )
        specs = list(task.reward_funcs)
    return [resolve_function(s, BUILTIN_REWARDS, f"algorithm.reward_funcs[{i}]") for i, s in enumerate(specs)]


def _accepts_keyword(func: Callable, name: str) -> bool:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # some builtins and C callables have no signature
        return True
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _name(func: Callable) -> str:
    return getattr(func, "__name__", None) or repr(func)


def prompt_token_ids(tokenizer: Any, prompt: str | list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of a standard (string) or conversational (messages; chat template applied, with the
    environment's ``tools`` if any) prompt."""
    if isinstance(prompt, list):
        kwargs = {"tools": tools} if tools else {}
        prompt = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False, **kwargs)
    return tokenizer(prompt, add_special_tokens=False).input_ids


class Generator:
    """Turns prompt records into :class:`~rlfleet.types.Group` s with the engine's current weights."""

    def __init__(
        self,
        engine: SamplingEngine,
        tokenizer: Any,
        generation: GenerationConfig,
        algorithm: AlgorithmBase,
        reward_funcs: Sequence[Callable],
        reward_weights: Sequence[float] | None = None,
        group_filter: Callable | None = None,
        environment: Any = None,
        rewards: InlineRewards | RewardWorker | None = None,
    ):
        if not reward_funcs:
            raise ValueError("Generator: at least one reward function is needed")
        if (algorithm.num_remains_in_group is None) != (group_filter is None):
            raise ValueError("Generator: a group filter is needed exactly when algorithm.num_remains_in_group is set")
        self.engine = engine
        self.tokenizer = tokenizer
        self.generation = generation
        self.algorithm = algorithm
        self.reward_funcs = list(reward_funcs)
        # where the reward calls run: a RewardWorker process (from_config), or this process (unit tests)
        self.rewards = rewards or InlineRewards(self.reward_funcs, algorithm.reward_timeout_s,
                                                algorithm.reward_concurrency)
        self.reward_weights = None if reward_weights is None else list(reward_weights)
        self.group_filter = group_filter
        self._filter_takes_lengths = group_filter is not None and _accepts_keyword(group_filter, "completion_lengths")
        self._logged: set[str] = set()  # names of functions whose failure was logged already
        self.environment = environment
        self.episodes = None if environment is None else EpisodeRunner(
            engine, tokenizer, environment, generation.max_turns, generation.env_timeout_s)

    @classmethod
    def from_config(cls, engine: SamplingEngine, tokenizer: Any, cfg: RLFleetConfig) -> Generator:
        """Reward functions, weights and group filter resolved from ``cfg.algorithm`` (and ``cfg.data``'s task)."""
        alg = cfg.algorithm
        group_filter = None
        if alg.num_remains_in_group is not None:
            group_filter = resolve_function(alg.group_filter_func, BUILTIN_GROUP_FILTERS, "algorithm.group_filter_func")
        environment = None
        if alg.environment is not None:
            from rlfleet.environments import make_environment

            environment = make_environment(alg.environment, alg.environment_kwargs)
        funcs = resolve_reward_funcs(alg, cfg.data)
        rewards = RewardWorker(funcs, alg.reward_timeout_s, alg.reward_concurrency)
        return cls(engine, tokenizer, cfg.generation, alg, funcs, alg.reward_weights, group_filter, environment,
                   rewards)

    def close(self) -> None:
        """Stop the reward worker (the generator's only process of its own)."""
        self.rewards.close()

    # ------------------------------------------------------------------------------------------------------------

    def _prompt_token_ids(self, prompt: str | list[dict]) -> list[int]:
        return prompt_token_ids(self.tokenizer, prompt, getattr(self.environment, "tools", None))

    def _log_once(self, key: str, message: str, err: BaseException | None = None) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.warning("%s (logged once)", message)
            if err is not None:  # the traceback, for a bug report, only where debug logging is on
                logger.debug("traceback of: %s", message, exc_info=err)

    def _score(self, prompts: list, completions: list, completion_ids: list[list[int]], columns: dict[str, list],
               num_groups: int) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """Per-function rewards ``[F, N]`` (NaN = None), the groups a failing function spoiled ``[num_groups]``, and
        the groups lost to calls that timed out or died with the reward worker (``errors/reward_timeout``,
        ``errors/reward_lost``; both are also in ``errors/reward``) with what the functions counted
        (``reward/<function>/count/<what>``, e.g. the sandboxed code reward's program ends).

        A synchronous function gets one call with every completion; an ``async`` one a call per group, run side by
        side (:mod:`~rlfleet.generation.reward_worker`)."""
        N = len(completions)
        G = N // num_groups
        per_func = np.full((len(self.reward_funcs), N), np.nan)  # [F, N]
        spoiled = np.zeros(num_groups, dtype=bool)  # [num_groups]
        calls, spans = [], []  # spans[i]: (function, first group, end group) of calls[i]
        for k in range(len(self.reward_funcs)):
            for g0, g1 in ([(g, g + 1) for g in range(num_groups)] if self.rewards.is_async[k] else [(0, num_groups)]):
                rows = slice(g0 * G, g1 * G)
                calls.append((k, {"prompts": prompts[rows], "completions": completions[rows],
                                  "completion_ids": completion_ids[rows],
                                  **{key: values[rows] for key, values in columns.items()}}))
                spans.append((k, g0, g1))
        failed = {"timeout": 0, "lost": 0}
        counts: dict[str, float] = {}  # reward/<function>/count/<what>: what a function counts (``outcomes``)
        for (k, g0, g1), out in zip(spans, self.rewards.run(calls), strict=True):
            name, n = _name(self.reward_funcs[k]), (g1 - g0) * G
            for what, c in (out.counts or {}).items():
                counts[f"reward/{name}/count/{what}"] = counts.get(f"reward/{name}/count/{what}", 0.0) + c
            if out.status == "ok" and len(out.values) != n:
                out = Outcome("error", detail=f"returned {len(out.values)} values for {n} completions")
            if out.status != "ok":
                self._log_once(f"{name} {out.status}", f"reward function {name} failed: {out.detail}; {DROPPED}")
                if out.trace:
                    logger.debug("reward function %s: %s", name, out.trace)
                spoiled[g0:g1] = True
                failed[out.status] = failed.get(out.status, 0) + (g1 - g0)
                continue
            values = np.array([np.nan if v is None else v for v in out.values], dtype=np.float64)  # [n]
            bad = ~np.isfinite(values) & np.array([v is not None for v in out.values])  # NaN/inf, not None
            if bad.any():
                self._log_once(name, f"reward function {name} returned NaN or inf; {DROPPED}")
                spoiled[g0:g1] |= bad.reshape(g1 - g0, G).any(axis=1)
            per_func[k, g0 * G:g1 * G] = values
        return per_func, spoiled, {"errors/reward_timeout": float(failed["timeout"]),
                                   "errors/reward_lost": float(failed["lost"]), **counts}

    def _filter(self, group_completions: list[list], rewards: np.ndarray, lengths: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
        """GFPO: kept indices ``[num_groups, k]`` (best first) and the groups a failing filter spoiled."""
        k, name = self.algorithm.num_remains_in_group, _name(self.group_filter)
        extra = {"completion_lengths": lengths.tolist()} if self._filter_takes_lengths else {}
        try:
            out = self.group_filter(group_completions=group_completions, group_rewards=rewards.tolist(), **extra)
            scores = np.asarray(out, dtype=np.float64)  # [num_groups, G]
            if scores.shape != rewards.shape:
                raise ValueError(f"returned scores of shape {scores.shape} for groups of shape {rewards.shape}")
        except Exception as err:  # deliberate, as for reward functions
            self._log_once(name, f"group filter {name} failed: {type(err).__name__}: {err}; {DROPPED}", err)
            return np.zeros((len(rewards), k), dtype=np.int64), np.ones(len(rewards), dtype=bool)
        spoiled = (np.isnan(scores) | (scores == np.inf)).any(axis=1)  # [num_groups]; -inf is a valid "last"
        if spoiled.any():
            self._log_once(name, f"group filter {name} returned NaN or +inf; {DROPPED}")
        return select_top_k(scores, k), spoiled

    # ------------------------------------------------------------------------------------------------------------

    def _encode_prompts(self, records: list[dict]) -> tuple[list[dict], list[list[int]], int]:
        """Prompt token ids of the records that fit the engine, those records, and how many did not fit."""
        kept, prompt_token_ids = [], []
        for record in records:
            ids = self._prompt_token_ids(record["prompt"])
            if len(ids) >= self.engine.max_model_len:
                self._log_once("prompt length", f"prompt {record['prompt_id']} has {len(ids)} tokens, too many for "
                               f"model.max_model_len={self.engine.max_model_len}; such prompts are skipped and "
                               "counted in gen/prompts_too_long")
                continue
            kept.append(record)
            prompt_token_ids.append(ids)
        return kept, prompt_token_ids, len(records) - len(kept)

    def _sample_episodes(self, records: list[dict], prompt_token_ids: list[list[int]], n: int,
                         temperature: float | None = None) -> tuple[list[list[Episode]], dict[str, float]]:
        """``n`` episodes per record, and their stats: ``env/episodes``, ``env/turns`` (model turns, summed),
        ``env/seconds``, ``env/tokens`` (the environment's), ``env/model_tokens``, ``errors/env`` (groups failed)."""
        episodes, env_s = self.episodes.run(records, prompt_token_ids, n, temperature) if records else ([], 0.0)
        flat = [ep for group in episodes for ep in group]
        failed = [group for group in episodes if any(ep.error for ep in group)]
        for group in failed:
            error = next(ep.error for ep in group if ep.error)
            self._log_once("env: " + ": ".join(error.split(": ")[:2]),  # once per method and error type
                           f"environment {type(self.environment).__name__} failed an episode: {error}; its group is "
                           "dropped and counted in errors/env")
        model_tokens = sum(ep.model_tokens for ep in flat)
        return episodes, {"env/episodes": float(len(flat)), "env/turns": float(sum(ep.turns for ep in flat)),
                          "env/seconds": env_s, "env/tokens": float(sum(len(ep.token_ids) for ep in flat)
                                                                    - model_tokens),
                          "env/model_tokens": float(model_tokens), "errors/env": float(len(failed))}

    def _decode_and_score(self, records: list[dict], flat: list, G: int
                          ) -> tuple[list[list[int]], list[str], list, np.ndarray, np.ndarray, dict[str, float]]:
        """``flat``: ``G`` samples per record, record by record. Their token ids, decoded texts, completions as the
        reward functions get them, per-function rewards ``[F, N]``, the groups a failing function spoiled and the
        failure counts of :meth:`_score`."""
        completion_ids = [c.token_ids for c in flat]
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True) if flat else []
        prompts = [r["prompt"] for r in records for _ in range(G)]
        if self.episodes is None:
            completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t
                           for t, p in zip(texts, prompts)]
        else:  # the episode after the prompt: the model's turns and the environment's messages
            completions = [c.messages for c in flat]
        columns = {key: [r[key] for r in records for _ in range(G)]
                   for key in (records[0] if records else {}) if key != "prompt"}
        if records:
            per_func, spoiled, failed = self._score(prompts, completions, completion_ids, columns, len(records))
        else:  # nothing to score: do not call user functions with empty lists
            per_func, spoiled, failed = np.empty((len(self.reward_funcs), 0)), np.zeros(0, dtype=bool), {}
        return completion_ids, texts, completions, per_func, spoiled, failed

    def evaluate(self, records: list[dict], n: int, temperature: float | None = None) -> dict[str, float]:
        """Held-out rewards with the engine's current weights: ``n`` samples per record (``temperature`` 0: greedy;
        None: the training temperature; with an environment, whole episodes), scored by the reward functions as in
        training. Nothing is trained and no group is made. Stats: ``eval/reward/mean`` over every scored sample,
        ``eval/reward/<function>/mean``, ``eval/prompts`` (scored), ``eval/samples``, ``eval/tokens`` (the model's),
        ``eval/truncated_frac``, ``eval/errors`` (prompts a failing reward function or environment spoiled, or too
        long), ``eval/seconds`` and ``policy_version``."""
        start = time.perf_counter()
        kept, prompt_token_ids, too_long = self._encode_prompts(records)
        env_failed = 0
        if self.episodes is None:
            sampling = {} if temperature is None else {"temperature": temperature}
            samples = self.engine.sample(prompt_token_ids, n, **sampling) if prompt_token_ids else []  # [prompts][n]
        else:
            samples, env_stats = self._sample_episodes(kept, prompt_token_ids, n, temperature)
            ok_env = [i for i, group in enumerate(samples) if not any(ep.error for ep in group)]
            env_failed = int(env_stats["errors/env"])
            kept, samples = [kept[i] for i in ok_env], [samples[i] for i in ok_env]
        flat = [c for group in samples for c in group]
        _, _, _, per_func, spoiled, _ = self._decode_and_score(kept, flat, n)
        rewards = combine_rewards(per_func, self.reward_weights).reshape(len(samples), n)[~spoiled]  # [ok, n]
        scored_flat = np.repeat(~spoiled, n)  # [N] samples of the groups no function spoiled
        stats = {
            "eval/prompts": float((~spoiled).sum()),
            "eval/samples": float(len(flat)),
            "eval/tokens": float(sum(c.model_tokens for c in flat)),
            "eval/truncated_frac": float(np.mean([c.truncated for c in flat])) if flat else 0.0,
            "eval/errors": float(spoiled.sum() + env_failed + too_long),
            "eval/seconds": time.perf_counter() - start,
            "policy_version": float(self.engine.version),
        }
        if np.isfinite(rewards).any():
            stats["eval/reward/mean"] = float(rewards[np.isfinite(rewards)].mean())
        for k, func in enumerate(self.reward_funcs):
            values = per_func[k][scored_flat]
            if np.isfinite(values).any():
                stats[f"eval/reward/{_name(func)}/mean"] = float(values[np.isfinite(values)].mean())
        return stats

    def generate(self, records: list[dict]) -> tuple[list[Group], dict[str, float]]:
        """Sample, score, filter and compute advantages for ``records``; returns the groups and a stats dict.

        Stats: ``gen/*`` (groups, tokens sampled, seconds, tokens_per_s, truncated_frac, dropped_groups,
        prompts_too_long), ``errors/reward`` (groups dropped for a failing reward or filter function), with an
        environment ``env/*`` and ``errors/env`` (:meth:`_sample_episodes`),
        ``reward/mean``, ``reward/std``, ``reward/<function>/mean`` over every sample of the surviving groups
        (before GFPO filtering; absent when nothing was scored) with ``rewards/<function>/n``, ``/sum`` and ``/sum_sq``
        (the step record's per-function mean and std add them up), ``reward/frac_zero_std`` and ``policy_version``.
        """
        start = time.perf_counter()
        G = self.generation.num_generations
        kept_records, prompt_token_ids, too_long = self._encode_prompts(records)
        env_stats: dict[str, float] = {}
        if self.episodes is None:
            samples = self.engine.sample(prompt_token_ids, G) if prompt_token_ids else []  # [num_groups][G]
        else:
            samples, env_stats = self._sample_episodes(kept_records, prompt_token_ids, G)
            ok_env = [i for i, group in enumerate(samples) if not any(ep.error for ep in group)]
            kept_records, prompt_token_ids, samples = ([x[i] for i in ok_env]
                                                       for x in (kept_records, prompt_token_ids, samples))
        return self._groups(kept_records, prompt_token_ids, samples, start, too_long, env_stats)

    def generate_each(self, records: list[dict], sampled: Callable[[], None] | None = None
                      ) -> Iterator[tuple[list[str], list[Group], dict[str, float]]]:
        """:meth:`generate` on a continuous engine, each group handed on the moment it is made rather than with
        the request's last: yields ``(prompt ids, groups, stats)`` as groups are made, the prompt ids those of the
        records settled (their groups made or dropped), each record's in exactly one yield. The groups whose last
        completions ended at the same engine step are made together (one call of each reward function, as
        :meth:`generate`'s); their stats are :meth:`generate`'s for those groups (the prompts too long for the
        engine settled and counted in the first). With an environment each record is a :meth:`generate` of its
        own, on a thread of its own (its episodes the coroutines of that thread's loop). ``sampled`` is called once
        the request's last token is sampled (before its last groups are scored)."""
        sampled = sampled or (lambda: None)
        if self.episodes is not None:
            with ThreadPoolExecutor(max(1, len(records)), thread_name_prefix="rlfleet-episodes") as threads:
                ends = {threads.submit(self.generate, [record]): record for record in records}
                for count, end in enumerate(as_completed(ends), start=1):
                    if count == len(ends):  # the last episode ended
                        sampled()
                    yield [str(ends[end]["prompt_id"])], *end.result()
            return
        start = time.perf_counter()
        G = self.generation.num_generations
        kept_records, prompt_token_ids, too_long = self._encode_prompts(records)
        kept = {id(record) for record in kept_records}
        settled = [str(record["prompt_id"]) for record in records if id(record) not in kept]  # too long
        pending = {self.engine.submit(ids, G): i for i, ids in enumerate(prompt_token_ids)}  # future -> record
        if not pending:
            sampled()
            yield settled, *self._groups([], [], [], start, too_long)
        while pending:
            ended, _ = wait(pending, return_when=FIRST_COMPLETED)
            results = {pending.pop(future): future.result() for future in ended}  # record -> its [G] completions
            if not pending:
                sampled()
            rows = sorted(results)
            settled += [str(kept_records[i]["prompt_id"]) for i in rows]
            yield settled, *self._groups([kept_records[i] for i in rows], [prompt_token_ids[i] for i in rows],
                                         [results[i] for i in rows], start, too_long)
            settled, too_long = [], 0

    def _groups(self, kept_records: list[dict], prompt_token_ids: list[list[int]], samples: list[list[Completion]],
                start: float, too_long: int = 0, env_stats: dict[str, float] | None = None
                ) -> tuple[list[Group], dict[str, float]]:
        """Score, filter and compute advantages for sampled ``samples`` (``[num_groups][G]``, of ``kept_records``);
        the groups and :meth:`generate`'s stats (``start``: when the request began; ``too_long``: its prompts
        skipped; ``env_stats``: its episodes', whose ``env/model_tokens`` are the tokens sampled)."""
        G = self.generation.num_generations
        env_stats = dict(env_stats or {})
        if "env/model_tokens" in env_stats:
            sampled_tokens = int(env_stats.pop("env/model_tokens"))
        else:
            sampled_tokens = sum(len(c.token_ids) for group in samples for c in group)
        version = self.engine.version
        num_groups = len(samples)

        # Decode and score every completion; rows are laid out group by group: [N = num_groups * G].
        flat: list[Completion] = [c for group in samples for c in group]
        completion_ids, texts, completions, per_func, spoiled, failed = self._decode_and_score(kept_records, flat, G)
        rewards = combine_rewards(per_func, self.reward_weights).reshape(num_groups, G)  # [ng, G]
        lengths = np.array([c.model_tokens for c in flat], dtype=np.int64).reshape(num_groups, G)  # [ng, G]

        # GFPO filter, then advantages on the kept rows of the surviving groups.
        ok = np.flatnonzero(~spoiled)  # [n_ok]
        if self.group_filter is not None and len(ok):
            group_completions = [completions[g * G:(g + 1) * G] for g in ok]
            keep, spoiled_by_filter = self._filter(group_completions, rewards[ok], lengths[ok])  # [n_ok, k]
            keep, ok = keep[~spoiled_by_filter], ok[~spoiled_by_filter]
        else:
            keep = np.tile(np.arange(G), (len(ok), 1))  # [n_ok, G]
        adv = group_advantages(np.take_along_axis(rewards[ok], keep, axis=1), self.algorithm.scale_rewards)
        groups = [
            _make_group(kept_records[g], prompt_token_ids[g], [samples[g][j] for j in keep[i]], rewards[g, keep[i]],
                        adv.advantages[i], float(adv.std[i]), version, texts[g * G + int(keep[i][0])])
            for i, g in enumerate(ok)
        ]

        seconds = time.perf_counter() - start
        env_failed = int(env_stats.get("errors/env", 0))
        stats = {
            "gen/groups": float(len(groups)),
            "gen/tokens": float(sampled_tokens),
            "gen/seconds": seconds,
            "gen/tokens_per_s": sampled_tokens / seconds if seconds > 0 else 0.0,
            "gen/truncated_frac": float(np.mean([c.truncated for c in flat])) if flat else 0.0,
            "gen/dropped_groups": float(num_groups - len(groups) + too_long + env_failed),
            "gen/prompts_too_long": float(too_long),
            "errors/reward": float(num_groups - len(groups)),
            **failed,
            "policy_version": float(version),
            **env_stats,
        }
        if groups:
            spans = [g.version_span for g in groups]
            stats |= {"gen/version_span_mean": float(np.mean(spans)), "gen/version_span_max": float(max(spans))}
        scored = rewards[ok]  # [n_ok, G]  all samples of the surviving groups
        if np.isfinite(scored).any():
            finite = scored[np.isfinite(scored)]
            stats |= {"reward/mean": float(finite.mean()), "reward/std": float(finite.std()),
                      "reward/frac_zero_std": float(adv.zero_std.mean())}
            for k, func in enumerate(self.reward_funcs):
                values = per_func[k].reshape(num_groups, G)[ok]
                if np.isfinite(values).any():
                    finite = values[np.isfinite(values)]
                    name = _name(func)
                    # the step record's rewards/<function>/mean and /std (TRL's names) over its window's groups
                    stats |= {f"reward/{name}/mean": float(finite.mean()), f"rewards/{name}/n": float(finite.size),
                              f"rewards/{name}/sum": float(finite.sum()),
                              f"rewards/{name}/sum_sq": float(np.square(finite).sum())}
        return groups, stats


def _make_group(record: dict, prompt_token_ids: list[int], kept: list[Completion], rewards: np.ndarray,
                advantages: np.ndarray, reward_std: float, version: int, first_text: str) -> Group:
    """Pack the kept completions of one prompt, right-padded with 0 to the longest: arrays ``[k, T]``. Each token's
    policy version is the completion's own (continuous generation) or ``version``; the group's is the oldest."""
    T = max(len(c.token_ids) for c in kept)
    per_token = [c.versions if getattr(c, "versions", None) else [version] * len(c.token_ids) for c in kept]
    oldest = min((min(v) for v in per_token if v), default=version)
    versions = np.full((len(kept), T), oldest, dtype=np.int32)  # [k, T]  padding: the oldest
    ids = np.zeros((len(kept), T), dtype=np.int32)  # [k, T]
    behaviour_logprobs = np.zeros((len(kept), T), dtype=np.float32)  # [k, T]
    loss_mask = np.zeros((len(kept), T), dtype=bool) if isinstance(kept[0], Episode) else None  # [k, T]
    for row, c in enumerate(kept):
        ids[row, :len(c.token_ids)] = c.token_ids
        versions[row, :len(c.token_ids)] = per_token[row]
        behaviour_logprobs[row, :len(c.logprobs)] = c.logprobs
        if loss_mask is not None:
            loss_mask[row, :len(c.loss_mask)] = c.loss_mask
    return Group(
        prompt_id=str(record["prompt_id"]),
        prompt_token_ids=np.asarray(prompt_token_ids, dtype=np.int32),
        completion_ids=ids,
        completion_lengths=np.array([len(c.token_ids) for c in kept], dtype=np.int32),
        behaviour_logprobs=behaviour_logprobs,
        rewards=np.asarray(rewards, dtype=np.float32),
        advantages=advantages,
        truncated=np.array([c.truncated for c in kept], dtype=bool),
        policy_version=oldest,
        reward_std=reward_std,
        meta={"completion": first_text[:200]},  # the first kept completion (the best under GFPO), for logs
        loss_mask=loss_mask,
        token_versions=None if (versions == oldest).all() else versions,
    )
