"""Multi-turn episodes: the model's turns sampled by the engine, the environment's answers between them, kept as
token ids. No Ray, no vLLM.

**Token-faithful.** An episode is the prompt's token ids followed by, turn after turn, the tokens the engine
sampled (kept as sampled: never decoded and encoded again, which can change the tokens and so their log-probs) and
the environment's messages as the chat template renders them. Those are found by rendering a fixed two-message
conversation whose assistant content is a marker, followed by the environment's messages and the generation
prompt, and taking the text after the marker: the end of the assistant's turn, the environment's messages, and the
start of the next assistant turn. When the model's turn ended with its EOS token (``<|im_end|>``), the text the
template writes for it is left out; a turn cut by ``generation.max_completion_length`` gets the template's end of
turn from the environment's side. Those tokens carry ``loss_mask`` 0 and behaviour log-prob 0.

**Batched engine** (``generation.engine: batched``). All episodes of a request advance together: the first turn
samples ``num_generations`` completions per prompt in one engine call (as a single-turn request does), and each
later turn is one engine call for every episode still running. The environment answers the episodes of a turn in
parallel threads, each within ``generation.env_timeout_s``.

**Continuous engine** (:class:`~rlfleet.generation.continuous.ContinuousEngine`). Every episode is a coroutine (one
event loop per request, on the request's thread): its first turn is its share of its group's ``num_generations``
completions (one request), and its next turn is submitted to the running engine the moment its environment
answered, so turns of different episodes interleave and a slow environment delays only its own episode (and, as
ever, its group's delivery). Each environment call runs on a thread of its own while it is pending, never on the
engine's loop thread nor the event loop. The coroutines run in the caller's context, so an evaluation's pinned
weights hold for every turn.

**Ending.** An episode ends when the environment says it is complete, after ``generation.max_turns`` model turns,
or when the next turn would not fit ``model.max_model_len``. It is ``truncated`` (for
``algorithm.mask_truncated_completions``) when it ended on a turn cut by the length limit, or for want of room.
An environment that raises, times out or answers with something other than a non-empty list of
``{"role": str, "content": str}`` messages fails its episode, and the episode's whole group is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rlfleet.generation.continuous import ContinuousEngine

logger = logging.getLogger(__name__)
MARKER = "\u2063rlfleet-turn\u2063"  # an invisible separator around a word no template or environment writes


@dataclass
class Episode:
    """One sampled episode: everything after the prompt, as the engine and the chat template produced it."""

    group: int  # index of its group (prompt) in the request
    token_ids: list[int] = field(default_factory=list)  # [T] model and environment tokens
    logprobs: list[float] = field(default_factory=list)  # [T] behaviour log-probs; 0 on environment tokens
    loss_mask: list[bool] = field(default_factory=list)  # [T] True on the model's tokens
    versions: list[int] = field(default_factory=list)  # [T] policy version of each token (the environment's: the
    # version of the model turn before them)
    messages: list[dict] = field(default_factory=list)  # the turns after the prompt, for the reward functions
    truncated: bool = False
    done: bool = False
    turns: int = 0  # model turns
    error: str | None = None  # why the environment failed it
    state: Any = None  # the environment's state of this episode

    @property
    def model_tokens(self) -> int:
        return sum(self.loss_mask)


def env_timeout(timeout_s: float) -> TimeoutError:
    """The error of an environment call still running after ``generation.env_timeout_s``."""
    return TimeoutError(f"no answer within generation.env_timeout_s={timeout_s:g} s")


def call_all(calls: list[Callable[[], Any]], timeout_s: float) -> list[tuple[Any, BaseException | None]]:
    """Run ``calls`` in parallel daemon threads; ``(result, None)`` or ``(None, error)`` each, a call still running
    after ``timeout_s`` gives a ``TimeoutError`` (its thread is left behind: Python cannot stop it)."""
    results: list[tuple[Any, BaseException | None]] = [(None, None)] * len(calls)

    def run(i: int, call: Callable[[], Any]) -> None:
        try:
            results[i] = (call(), None)
        except Exception as err:  # deliberate: a user's environment must not stop generation
            results[i] = (None, err)

    threads = [threading.Thread(target=run, args=(i, c), daemon=True, name=f"rlfleet-env-{i}")
               for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for i, t in enumerate(threads):
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            results[i] = (None, env_timeout(timeout_s))
    return results


def check_messages(out: Any) -> list[dict]:
    """The environment's answer, if it is a non-empty list of ``{"role": str, "content": str, ...}``; else raises."""
    if not isinstance(out, list) or not out:
        raise ValueError(f"env_response returned {type(out).__name__} {str(out)[:80]!r}, not a non-empty list of "
                         "messages")
    for m in out:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"env_response returned the message {str(m)[:80]!r}; a message is a dict with string "
                             "'role' and 'content'")
    return out


class ObservationTokens:
    """Token ids of the environment's messages between two model turns, as the chat template renders them."""

    def __init__(self, tokenizer: Any, tools: list[dict] | None):
        self.tokenizer = tokenizer
        self.tools = tools
        self._base = [{"role": "user", "content": "?"}, {"role": "assistant", "content": MARKER}]

    def __call__(self, last_model_token: int, env_messages: list[dict]) -> list[int]:
        kwargs = {"tools": self.tools} if self.tools else {}
        text = self.tokenizer.apply_chat_template(self._base + env_messages, add_generation_prompt=True,
                                                  tokenize=False, **kwargs)
        tail = text[text.index(MARKER) + len(MARKER):]  # end of the assistant's turn, the messages, next turn
        if last_model_token in self.tokenizer.all_special_ids:  # the model's EOS, already in the sequence
            sampled_end = self.tokenizer.decode([last_model_token])
            if tail.startswith(sampled_end):
                tail = tail[len(sampled_end):]
        return self.tokenizer(tail, add_special_tokens=False).input_ids


class EpisodeRunner:
    """Samples the episodes of a request with an engine and an environment (see the module docstring)."""

    def __init__(self, engine: Any, tokenizer: Any, environment: Any, max_turns: int, timeout_s: float):
        self.engine = engine
        self.tokenizer = tokenizer
        self.env = environment
        self.max_turns = max_turns
        self.timeout_s = timeout_s
        self.observation = ObservationTokens(tokenizer, getattr(environment, "tools", None))

    def run(self, records: list[dict], prompt_token_ids: list[list[int]], n: int, temperature: float | None = None
            ) -> tuple[list[list[Episode]], float]:
        """``n`` episodes per record: ``out[i][j]`` is record i's j-th; and the seconds spent in the environment.
        ``temperature``: the engine's sampling temperature for every turn (evaluation); None: the training one."""
        sampling = {} if temperature is None else {"temperature": temperature}
        episodes = [[Episode(group=i) for _ in range(n)] for i in range(len(records))]
        flat = [ep for group in episodes for ep in group]
        start = time.perf_counter()
        setups = call_all([lambda r=records[ep.group]: self.env.setup_state(dict(r)) for ep in flat], self.timeout_s)
        env_s = time.perf_counter() - start
        for ep, (state, err) in zip(flat, setups):
            ep.state = state
            if err is not None:
                self._fail(episodes, ep, "setup_state", err)
        ready = [i for i, group in enumerate(episodes) if not group[0].done]
        if isinstance(self.engine, ContinuousEngine):
            return episodes, env_s + self._run_each(records, prompt_token_ids, episodes, ready, n, sampling)
        samples = self.engine.sample([prompt_token_ids[i] for i in ready], n, **sampling) if ready else []  # turn 1
        running = [(ep, completion) for i, group in zip(ready, samples)
                   for ep, completion in zip(episodes[i], group)]
        for turn in range(1, self.max_turns + 1):
            for ep, completion in running:
                self._add_model_turn(ep, completion, last=turn == self.max_turns)
            asking = [ep for ep, _ in running if not ep.done]
            start = time.perf_counter()
            answers = call_all([lambda ep=ep: self._answer(records[ep.group], ep) for ep in asking], self.timeout_s)
            env_s += time.perf_counter() - start
            for ep, (out, err) in zip(asking, answers):
                if ep.done:  # its group failed meanwhile
                    continue
                if err is not None:
                    self._fail(episodes, ep, "is_completed / env_response", err)
                elif out is None:
                    ep.done = True
                else:
                    self._add_observation(ep, len(prompt_token_ids[ep.group]), out)
            going = [ep for ep in asking if not ep.done]
            if not going:
                break
            contexts = [prompt_token_ids[ep.group] + ep.token_ids for ep in going]
            running = [(ep, out[0]) for ep, out in zip(going, self.engine.sample(contexts, 1, **sampling))]
        return episodes, env_s

    def _run_each(self, records: list[dict], prompt_token_ids: list[list[int]], episodes: list[list[Episode]],
                  ready: list[int], n: int, sampling: dict) -> float:
        """The continuous engine's way: every episode of the ``ready`` groups is a coroutine of one event loop on
        the calling thread (module docstring). Returns the seconds its environment calls took, summed over
        episodes (they overlap)."""
        env_s = [0.0]

        async def run_all() -> None:
            firsts = {i: asyncio.wrap_future(self.engine.submit(prompt_token_ids[i], n, **sampling))
                      for i in ready}  # turn 1: one request per group
            # tasks copy this context: an evaluation's pinned weights hold for every turn
            await asyncio.gather(*(self._episode(records[i], prompt_token_ids[i], episodes, ep, firsts[i], j,
                                                 sampling, env_s)
                                   for i in ready for j, ep in enumerate(episodes[i])))

        asyncio.run(run_all())  # an engine failure (EngineStopped) reaches the caller
        return env_s[0]

    async def _episode(self, record: dict, prompt: list[int], episodes: list[list[Episode]], ep: Episode,
                       first: asyncio.Future, j: int, sampling: dict, env_s: list[float]) -> None:
        """One episode on the continuous engine: its turns, each submitted once the environment has answered."""
        completion = (await first)[j]
        for turn in range(1, self.max_turns + 1):
            if any(e.error for e in episodes[ep.group]):
                return  # its group failed: the other episodes stop
            self._add_model_turn(ep, completion, last=turn == self.max_turns)
            if ep.done:
                return
            start = time.perf_counter()
            out, err = await self._call_env(lambda: self._answer(record, ep))
            env_s[0] += time.perf_counter() - start
            if err is not None:
                self._fail(episodes, ep, "is_completed / env_response", err)
                return
            if out is None:
                ep.done = True
                return
            self._add_observation(ep, len(prompt), out)
            if ep.done:
                return
            completion = (await asyncio.wrap_future(self.engine.submit(prompt + ep.token_ids, 1, **sampling)))[0]

    async def _call_env(self, call: Callable[[], Any]) -> tuple[Any, BaseException | None]:
        """``call`` on a daemon thread of its own (user code may block; a thread cannot be stopped, so one that
        hangs is left behind, as :func:`call_all` does), awaited for at most ``env_timeout_s``."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def settle(result: tuple[Any, BaseException | None]) -> None:
            if not done.done():
                done.set_result(result)

        def run() -> None:
            try:
                result = (call(), None)
            except Exception as err:  # deliberate: a user's environment must not stop generation
                result = (None, err)
            try:
                loop.call_soon_threadsafe(settle, result)
            except RuntimeError:  # the loop has closed: the episode moved on past its timeout
                pass

        threading.Thread(target=run, daemon=True, name="rlfleet-env").start()
        try:
            return await asyncio.wait_for(done, self.timeout_s)
        except TimeoutError:
            return None, env_timeout(self.timeout_s)

    def _answer(self, record: dict, ep: Episode) -> list[dict] | None:
        """None when the episode is complete, else the environment's checked messages (runs in a thread)."""
        conversation = self._conversation(record, ep)
        if self.env.is_completed(conversation, ep.state):
            return None
        return check_messages(self.env.env_response(conversation, ep.state))

    @staticmethod
    def _conversation(record: dict, ep: Episode) -> list[dict]:
        return [dict(m) for m in record["prompt"]] + [dict(m) for m in ep.messages]

    def _add_model_turn(self, ep: Episode, completion: Any, last: bool) -> None:
        ep.token_ids += completion.token_ids
        ep.logprobs += completion.logprobs
        ep.loss_mask += [True] * len(completion.token_ids)
        ep.versions += getattr(completion, "versions", None) or [self.engine.version] * len(completion.token_ids)
        text = self.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        ep.messages.append({"role": "assistant", "content": text})
        ep.turns += 1
        ep.truncated = completion.truncated  # of the last turn so far
        ep.done = last or not completion.token_ids

    def _add_observation(self, ep: Episode, prompt_len: int, messages: list[dict]) -> None:
        ids = self.observation(ep.token_ids[-1], messages)
        if prompt_len + len(ep.token_ids) + len(ids) >= self.engine.max_model_len:  # no room for another turn
            ep.truncated = ep.done = True
            return
        ep.token_ids += ids
        ep.logprobs += [0.0] * len(ids)
        ep.loss_mask += [False] * len(ids)
        ep.versions += [ep.versions[-1] if ep.versions else self.engine.version] * len(ids)
        ep.messages += [dict(m) for m in messages]

    def _fail(self, episodes: list[list[Episode]], ep: Episode, where: str, err: BaseException) -> None:
        ep.error = f"{where}: {type(err).__name__}: {err}"
        for sibling in episodes[ep.group]:  # the group is dropped: its other episodes stop too
            sibling.done = True
        logger.debug("environment failed an episode: %s", ep.error, exc_info=err)
