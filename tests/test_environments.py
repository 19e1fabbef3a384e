"""Multi-turn episodes: the real vLLM engine and tiny model with scripted environments (tokens, masks, log-probs),
the learner on masked episodes, failures of environments, GFPO and replay on episodes, the config checks.

The tiny tokenizer maps byte b to id b, so the token ids the chat template gives the environment's messages are
written out here by hand: ``<|im_start|>`` + bytes of ``role\\ncontent`` + ``<|im_end|>`` + ``\\n`` (see
``rlfleet.models.CHAT_TEMPLATE``).
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from rlfleet.config import AlgorithmConfig, DataConfig, GenerationConfig, ModelConfig, RLFleetConfig, load_config
from rlfleet.data import PromptStream, load_prompt_dataset
from rlfleet.rewards import char_count_reward
from rlfleet.environments import Environment, ScriptedUser, make_environment
from rlfleet.generation.continuous import ContinuousEngine
from rlfleet.generation.engine import Engine
from rlfleet.generation.generator import Generator
from rlfleet.learner.policy import collate
from rlfleet.models import EOS_ID, IM_START_ID, load_causal_lm, load_tokenizer
from rlfleet.replay.buffer import ReplayBuffer
from rlfleet.config import ReplayConfig
from rlfleet.types import groups_from_arrays, groups_to_arrays
from tests.test_policy_learner import assert_grads_close, captured_grads, make_learner, reference_logprobs

GEN = GenerationConfig(num_generations=4, generation_batch_size=8, max_completion_length=6, max_turns=3,
                       env_timeout_s=5)
REPLIES = ["More {target}, please.", "Last: {target}!"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin:tiny")


@pytest.fixture(scope="module")
def vllm_engine(tiny_model_path):
    threads = torch.get_num_threads()
    yield Engine(ModelConfig(name_or_path=tiny_model_path), GEN, seed=0)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["batched", "continuous"])
def engine(request, vllm_engine):
    """The episodes' tests run on both engines: turns batched per request, and every episode on its own."""
    if request.param == "batched":
        yield vllm_engine
        return
    continuous = ContinuousEngine(vllm_engine)
    yield continuous
    continuous.shutdown()


def char_records(n: int) -> list[dict]:
    return PromptStream(load_prompt_dataset(DataConfig(dataset="builtin:char_count"), "test"), seed=0).next_batch(n)


def generator(engine, tokenizer, env, algorithm: AlgorithmConfig | None = None, group_filter=None,
              generation: GenerationConfig = GEN) -> Generator:
    return Generator(engine, tokenizer, generation, algorithm or AlgorithmConfig(), [char_count_reward],
                     group_filter=group_filter, environment=env)


@torch.no_grad()
def hf_logprobs(model, prompt: np.ndarray, completion: np.ndarray) -> np.ndarray:
    """log softmax(logits / T) of each token after the prompt, one unpadded sequence (T = GEN.temperature)."""
    ids = torch.as_tensor(np.concatenate([prompt, completion]), dtype=torch.long)[None]  # [1, P+L]
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float() / GEN.temperature  # [L, V]
    return logits.log_softmax(-1).gather(-1, ids[0, len(prompt):, None])[:, 0].numpy()  # [L]


def user_turn(text: str, after_eos: bool) -> list[int]:
    """The tokens between two model turns when the user says ``text``: the end of the model's turn (its EOS only
    when the model did not sample it), the user's message, the next assistant header."""
    return ([] if after_eos else [EOS_ID]) + [ord("\n"), IM_START_ID, *f"user\n{text}".encode(), EOS_ID,
                                              ord("\n"), IM_START_ID, *b"assistant\n"]


def test_observation_tokens_leave_out_only_the_models_own_eos():
    """After a turn that ended with EOS the template's EOS is not repeated; after a cut turn it is written, even when
    the model's last byte is the first character of the EOS's text ('<' of '<|im_end|>')."""
    from rlfleet.generation.episodes import ObservationTokens

    observe = ObservationTokens(load_tokenizer("builtin:tiny"), None)
    reply = [{"role": "user", "content": "ok"}]
    assert observe(EOS_ID, reply) == user_turn("ok", after_eos=True)
    assert observe(ord("<"), reply) == user_turn("ok", after_eos=False)
    assert observe(ord("x"), reply) == user_turn("ok", after_eos=False)


def segments(mask: np.ndarray) -> list[tuple[bool, int, int]]:
    """Runs of equal mask values: (is_model, start, stop)."""
    edges = [0] + [t for t in range(1, len(mask)) if mask[t] != mask[t - 1]] + [len(mask)]
    return [(bool(mask[a]), a, b) for a, b in zip(edges, edges[1:])]


# ---------------------------------------------------------------------------------------------------------------
# Real engine
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.vllm
def test_episodes_hold_the_template_tokens_masked_and_the_engines_logprobs(engine, tokenizer, tiny_model_path):
    """Three model turns with the user's two replies between them: the user's tokens are exactly the chat
    template's rendering (written out by hand), carry mask 0 and behaviour log-prob 0; the model's tokens carry the
    engine's log-probs, equal to the HF forward pass over the whole multi-turn sequence; the reward sees the
    conversation (the model's turns decoded, the user's messages as given) and scores the model's text only."""
    gen = generator(engine, tokenizer, ScriptedUser(REPLIES))
    records = char_records(2)
    groups, stats = gen.generate(records)
    hf = load_causal_lm(tiny_model_path).eval()
    assert [g.prompt_id for g in groups] == [r["prompt_id"] for r in records]
    env_tokens = 0
    for g, record in zip(groups, records):
        assert g.loss_mask is not None and g.size == 4
        for row in range(g.size):
            L = int(g.completion_lengths[row])
            ids, mask, logprobs = g.completion_ids[row, :L], g.loss_mask[row, :L], g.behaviour_logprobs[row, :L]
            runs = segments(mask)
            assert [m for m, _, _ in runs] == [True, False, True, False, True]  # 3 model turns, 2 replies
            turns = [ids[a:b].tolist() for m, a, b in runs if m]
            assert all(1 <= len(t) <= GEN.max_completion_length for t in turns)
            for k, (_, a, b) in enumerate(r for r in runs if not r[0]):
                after_eos = turns[k][-1] == EOS_ID
                assert ids[a:b].tolist() == user_turn(REPLIES[k].format(target=record["target"]), after_eos)
                assert not logprobs[a:b].any()
                env_tokens += b - a
            assert not g.loss_mask[row, L:].any() and not g.completion_ids[row, L:].any()
            # the engine's log-probs of the model's tokens, against HF over prompt + the whole episode
            reference = hf_logprobs(hf, g.prompt_token_ids, ids)  # [L]
            np.testing.assert_allclose(logprobs[mask], reference[mask], atol=1e-4)
            # the reward: the target's share of the model's bytes, all three turns
            text = b"".join(tokenizer.decode(t, skip_special_tokens=True).encode() for t in turns)
            expected = text.count(record["target"].encode()) / max(len(text), 1)
            assert g.rewards[row] == pytest.approx(expected, abs=1e-6)
            assert g.truncated[row] == (turns[-1][-1] != EOS_ID)
    assert stats["env/episodes"] == 8 and stats["env/turns"] == 24 and stats["errors/env"] == 0
    assert stats["env/tokens"] == env_tokens
    assert stats["gen/tokens"] == sum(int(g.loss_mask.sum()) for g in groups)


@pytest.mark.vllm
def test_an_environment_ends_episodes_early_and_the_turn_limit_holds(engine, tokenizer):
    """The environment decides per episode (here: after the model's first turn for odd-numbered episodes), and no
    episode has more than max_turns model turns even when the environment would go on."""

    class EndsOddEpisodes(Environment):
        def setup_state(self, record):
            with self.lock:
                self.started += 1
                return {"number": self.started}

        def is_completed(self, messages, state):
            return state["number"] % 2 == 1

        def env_response(self, messages, state):
            return [{"role": "user", "content": "go on"}]

    env = EndsOddEpisodes()
    env.lock, env.started = threading.Lock(), 0
    groups, stats = generator(engine, tokenizer, env).generate(char_records(2))
    turns = sorted(sum(m for m, _, _ in segments(g.loss_mask[row, :g.completion_lengths[row]]))
                   for g in groups for row in range(g.size))
    assert turns == [1, 1, 1, 1, 3, 3, 3, 3]
    assert stats["env/turns"] == 16


@pytest.mark.vllm
def test_failing_environments_drop_their_groups_and_are_counted(engine, tokenizer, caplog):
    """Raising, hanging past env_timeout_s, or answering malformed messages fails the episode; its group is
    dropped and counted in errors/env, the other groups are kept. One log line per kind of failure."""
    release = threading.Event()

    class Flaky(Environment):
        def env_response(self, messages, state):
            target = state["record"]["target"]
            if target == self.raises:
                raise RuntimeError("tool crashed")
            if target == self.hangs:
                release.wait()  # never set before the timeout: a hung tool
            if target == self.malformed:
                return "not a list of messages"
            return [{"role": "user", "content": "again"}]

    records = char_records(8)
    targets = sorted({r["target"] for r in records})
    assert len(targets) >= 4
    env = Flaky()
    env.raises, env.hangs, env.malformed = targets[:3]
    quick = GEN.model_copy(update={"env_timeout_s": 3.0})  # the hung call always passes it; the others take microseconds
    try:
        with caplog.at_level("WARNING", logger="rlfleet.generation.generator"):
            groups, stats = generator(engine, tokenizer, env, generation=quick).generate(records)
    finally:
        release.set()
    bad = [r for r in records if r["target"] in targets[:3]]
    assert [g.prompt_id for g in groups] == [r["prompt_id"] for r in records if r["target"] not in targets[:3]]
    assert stats["errors/env"] == len(bad) and stats["errors/reward"] == 0
    assert stats["gen/dropped_groups"] == len(bad) and stats["gen/groups"] == len(records) - len(bad)
    text = caplog.text
    assert "RuntimeError: tool crashed" in text and "TimeoutError" in text and "not a non-empty list" in text
    assert text.count("RuntimeError: tool crashed") == 1  # logged once, though several groups failed alike


@pytest.mark.vllm
@pytest.mark.parametrize("engine", ["continuous"], indirect=True)
def test_on_the_continuous_engine_a_slow_environment_delays_only_its_own_episode(engine, tokenizer):
    """Every episode runs on its own: while the environment holds one episode's first answer, every other
    episode (its group's and the other group's) gets its first answer, samples its second turn and asks again; only
    then is the held answer given. Shown by the order of the environment's calls; the held call waits on an event
    that a turn-batched engine could never set (it would need the held answer first), so there it times out."""
    lock, events, others_asked_twice = threading.Lock(), [], threading.Event()
    episodes = 8  # 2 records x num_generations 4

    class HoldsTheFirst(Environment):
        def setup_state(self, record):
            with lock:
                self.started += 1
                return {"number": self.started, "asked": 0}

        def env_response(self, messages, state):
            state["asked"] += 1
            with lock:
                events.append(("asked", state["number"], state["asked"]))
                if sum(1 for e in events if e[0] == "asked" and e[2] == 2) == episodes - 1:
                    others_asked_twice.set()
            if state["number"] == 1 and state["asked"] == 1:
                assert others_asked_twice.wait(60), "the other episodes waited for the held one"
            with lock:
                events.append(("answered", state["number"], state["asked"]))
            return [{"role": "user", "content": "go on"}]

    env = HoldsTheFirst()
    env.started = 0
    generation = GEN.model_copy(update={"env_timeout_s": 120})  # past the held call's own 60 s wait
    groups, stats = generator(engine, tokenizer, env, generation=generation).generate(char_records(2))
    assert stats["errors/env"] == 0 and stats["env/turns"] == episodes * 3 and len(groups) == 2
    held = events.index(("answered", 1, 1))
    assert {n for kind, n, k in events[:held] if kind == "asked" and k == 2} == set(range(2, episodes + 1))
    assert events[held + 1:].count(("asked", 1, 2)) == 1  # the held episode then went on to its second turn


@pytest.mark.vllm
@pytest.mark.parametrize("engine", ["continuous"], indirect=True)
def test_an_evaluation_keeps_one_version_between_the_turns_of_its_episodes(engine, tokenizer, tiny_model_path):
    """On the continuous engine a load queued while an evaluation's episodes wait for the environment (no request of
    theirs in flight) is held until the evaluation ends: every token of every turn carries the version it started
    with. Without the hold, the load (queued before the next turn's request, on the one loop thread) would label
    every second turn with the new version."""
    base = engine.version
    all_waiting, loads = threading.Barrier(2, timeout=60), []
    weights = load_causal_lm(tiny_model_path).state_dict()  # the same weights, a new version label

    class LoadsMidEpisode(Environment):
        def env_response(self, messages, state):
            if all_waiting.wait() == 0:  # both episodes wait here: none of their requests is in flight
                loads.append(engine.load_async(weights, version=base + 1))
            return [{"role": "user", "content": "go on"}]

    one_turn_each = GEN.model_copy(update={"num_generations": 2, "max_turns": 2})
    with engine.pinned():
        (group,), _ = generator(engine, tokenizer, LoadsMidEpisode(), generation=one_turn_each).generate(
            char_records(1))
        assert not loads[0].done()
    assert group.token_versions is None and group.policy_version == base  # every token: the version it began with
    assert loads[0].result(timeout=60) == base + 1 and engine.version == base + 1


@pytest.mark.vllm
def test_gfpo_filters_episodes_by_the_models_tokens(engine, tokenizer):
    """The group filter receives whole conversations and, as completion_lengths, the model's token counts (not the
    environment's); kept rows are the ones it ranked first."""
    seen = {}

    def fewest_model_tokens(group_completions, group_rewards, completion_lengths):
        seen["completions"], seen["lengths"] = group_completions, completion_lengths
        return (-np.asarray(completion_lengths, dtype=float)).tolist()

    alg = AlgorithmConfig(num_remains_in_group=2, group_filter_func="shortest")
    groups, _ = generator(engine, tokenizer, ScriptedUser(REPLIES), alg, fewest_model_tokens).generate(
        char_records(2))
    for g, lengths, conversations in zip(groups, seen["lengths"], seen["completions"]):
        assert all([m["role"] for m in c] == ["assistant", "user", "assistant", "user", "assistant"]
                   for c in conversations)
        kept = sorted(g.loss_mask.sum(axis=1).tolist())
        assert kept == sorted(lengths)[:2]


# ---------------------------------------------------------------------------------------------------------------
# Learner and replay on episodes (no engine)
# ---------------------------------------------------------------------------------------------------------------


def episode_group(model, seed: int, advantages=(1.0, -0.5, 0.25)):
    """Three episodes [model turn | environment | model turn] with on-policy behaviour log-probs on the model's
    tokens and 0 on the environment's, as the generator builds them."""
    from rlfleet.types import Group

    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 256, (6,), generator=gen).numpy().astype(np.int32)
    shapes = [(4, 5, 3), (2, 7, 6), (5, 3, 1)]  # (model, environment, model) tokens per episode
    T = max(sum(s) for s in shapes)
    ids, mask, old = (np.zeros((3, T), dtype=t) for t in (np.int32, bool, np.float32))
    for row, (a, e, b) in enumerate(shapes):
        L = a + e + b
        ids[row, :L] = torch.randint(0, 256, (L,), generator=gen).numpy()
        mask[row, :a] = mask[row, a + e:L] = True
        old[row, :L] = np.where(mask[row, :L], reference_logprobs(model, prompt, ids[row, :L]), 0.0)
    return Group("episode", prompt, ids, np.array([sum(s) for s in shapes], dtype=np.int32), old,
                 np.asarray(advantages, dtype=np.float32), np.asarray(advantages, dtype=np.float32),
                 np.zeros(3, dtype=bool), 0, reward_std=0.6, loss_mask=mask)


@pytest.mark.parametrize("level", ["token", "sequence", "sequence_token"])
def test_loss_and_gradient_ignore_environment_tokens(level):
    """Behaviour log-probs at the environment's positions are replaced with garbage: the loss and the gradient do
    not move (they would through the ratio, GSPO's sequence mean included, if those positions counted). And the
    dapo gradient equals the hand-written one, -sum over the model's tokens of A * grad log p / N."""
    results = []
    for garbage in (False, True):
        learner = make_learner({"importance_sampling_level": level, "loss_type": "dapo"})
        group = episode_group(learner.model, seed=3)
        if garbage:
            group.behaviour_logprobs[~group.loss_mask] = -7.5
        grads = captured_grads(learner)
        metrics = learner.train_step([group])
        results.append((metrics["loss"], grads[0], metrics["learner/tokens"]))
    assert results[0][2] == results[1][2] == float(4 + 3 + 2 + 6 + 5 + 1)  # the model's tokens only
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    assert_grads_close(results[1][1], results[0][1])
    if level == "token":  # on-policy: ratio 1, d ratio = d log p; dapo divides by the model's token count
        learner = make_learner()
        group = episode_group(learner.model, seed=3)
        batch = collate([group], 256)
        logits = learner.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        P = batch.input_ids.shape[1] - batch.completion_ids.shape[1]
        logp = (logits[:, P - 1:-1].float() / 0.7).log_softmax(-1).gather(-1, batch.completion_ids[..., None])[..., 0]
        mask = torch.from_numpy(group.loss_mask).float()
        (-(torch.from_numpy(group.advantages)[:, None] * logp * mask).sum() / mask.sum()).backward()
        expected = {n: p.grad for n, p in learner.model.named_parameters()}
        assert_grads_close(results[0][1], expected)


def test_the_learner_reports_turns_and_the_environments_token_share():
    from rlfleet.learner.policy import batch_metrics

    group = episode_group(load_causal_lm(resolve_tiny()).eval(), seed=5)
    metrics = batch_metrics([group], policy_version=0)
    assert metrics["env/turns_per_episode"] == 2.0  # model, environment, model in every episode
    assert metrics["env/token_frac"] == pytest.approx((5 + 7 + 3) / (12 + 15 + 9))


def test_groups_with_loss_masks_survive_the_wire_format_and_the_replay_state():
    learner_free = load_causal_lm(resolve_tiny()).eval()
    group = episode_group(learner_free, seed=5)
    arrays, metas = groups_to_arrays([group], "x.")
    (back,) = groups_from_arrays(arrays, metas, "x.")
    np.testing.assert_array_equal(back.loss_mask, group.loss_mask)
    buffer = ReplayBuffer(ReplayConfig(replay_buffer_size=4), seed=0)
    buffer.add([group])
    restored = ReplayBuffer(ReplayConfig(replay_buffer_size=4), seed=0)
    restored.load_state_dict(*buffer.state_dict())
    (again,) = restored.sample(1, current_version=0)
    np.testing.assert_array_equal(again.loss_mask, group.loss_mask)
    np.testing.assert_array_equal(collate([again], 256).mask.numpy().astype(bool), group.loss_mask)


def resolve_tiny() -> str:
    from rlfleet.models import resolve_model_path

    return resolve_model_path("builtin:tiny")


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


def test_config_checks_name_the_field():
    with pytest.raises(ValueError, match="generation.max_turns: set without algorithm.environment"):
        RLFleetConfig(generation={"max_turns": 3})
    with pytest.raises(ValueError, match="generation.max_turns: 1 gives the environment 'scripted_user' no turn"):
        RLFleetConfig(algorithm={"environment": "scripted_user"})
    with pytest.raises(ValueError, match="algorithm.environment: 'nope' is not a built-in"):
        make_environment("nope", {})
    with pytest.raises(ValueError, match=r"algorithm.environment_kwargs: \{'reply': 1\} do not fit ScriptedUser"):
        make_environment("scripted_user", {"reply": 1})


def test_preflight_refuses_string_prompts_and_a_bad_environment():
    from rlfleet.cluster.preflight import preflight
    from rlfleet.config import ConfigError

    cfg = load_config(None, ["data.dataset=builtin:target_length", "algorithm.environment=scripted_user",
                             "generation.max_turns=2", "algorithm.environment_kwargs={replies: [1]}"])
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    text = str(err.value)
    assert "algorithm.environment: 'scripted_user' needs conversational prompts" in text
    assert "algorithm.environment_kwargs.replies: [1] must be a non-empty list of strings" in text



# ---------------------------------------------------------------------------------------------------------------
# A tool call end to end through the generator (a scripted engine; the tiny tokenizer with a Qwen-style template)
# ---------------------------------------------------------------------------------------------------------------

# Qwen2.5's rendering of tools, tool calls and tool results, cut down to what the test needs
QWEN_STYLE_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | map(attribute='function.name') | join(',') }}<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ScriptedEngine:
    """Says a tool call in the first turn and '#### <the tool's result>' once it has seen one."""

    version, max_model_len = 0, 512

    def __init__(self):
        self.contexts = []

    def sample(self, prompt_token_ids, n):
        from rlfleet.generation.engine import Completion

        out = []
        for ids in prompt_token_ids:
            self.contexts.append(list(ids))
            text = bytes(t for t in ids if t < 256).decode()
            if "<tool_response>" in text:
                result = text.rsplit("<tool_response>\n", 1)[1].split("\n", 1)[0]
                reply = f"So it is\n#### {result}".encode()
            else:
                call = {"name": "calculator", "arguments": {"expression": "(48 + 24) / 3"}}
                reply = f"<tool_call>\n{json.dumps(call)}\n</tool_call>".encode()
            out.append([Completion(list(reply) + [EOS_ID], [-0.5] * (len(reply) + 1), False) for _ in range(n)])
        return out


def test_a_tool_call_is_answered_in_the_template_and_the_answer_scored():
    from rlfleet.rewards import gsm8k_accuracy

    tokenizer = load_tokenizer("builtin:tiny")
    tokenizer.chat_template = QWEN_STYLE_TEMPLATE
    engine = ScriptedEngine()
    gen = Generator(engine, tokenizer, GEN.model_copy(update={"max_completion_length": 128}), AlgorithmConfig(),
                    [gsm8k_accuracy], environment=make_environment("calculator", {}))
    record = {"prompt_id": "q1", "prompt": [{"role": "user", "content": "48 + 24 apples, shared by 3?"}],
              "answer": "48 + 24 = 72 and 72 / 3 = 24\n#### 24"}
    (group,), stats = gen.generate([record])
    # the prompt lists the tool (the environment's schemas reached the template)
    assert bytes(t for t in group.prompt_token_ids if t < 256).decode().startswith("system\nTools: calculator\n")
    L = int(group.completion_lengths[0])
    runs = segments(group.loss_mask[0, :L])
    assert [m for m, _, _ in runs] == [True, False, True]  # call, tool result, answer; then is_completed
    _, a, b = runs[1]
    tool_turn = [ord("\n"), IM_START_ID, *b"user\n<tool_response>\n24\n</tool_response>", EOS_ID, ord("\n"),
                 IM_START_ID, *b"assistant\n"]
    assert group.completion_ids[0, a:b].tolist() == tool_turn
    assert engine.contexts[-1] == group.prompt_token_ids.tolist() + group.completion_ids[0, :b].tolist()
    np.testing.assert_array_equal(group.rewards, np.ones(4))  # the last turn's number, 24, is the answer
    assert stats["env/turns"] == 8 and stats["errors/env"] == 0
