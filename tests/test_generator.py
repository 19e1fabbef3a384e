"""The generator: real vLLM engine for shapes, log-probs, chat templates and GFPO; a fake engine for error paths."""

import logging

import numpy as np
import pytest
import torch

from rlfleet.generation.engine import Completion, Engine
from rlfleet.generation.generator import Generator
from rlfleet.generation.scoring import group_advantages
from rlfleet.config import AlgorithmConfig, DataConfig, GenerationConfig, ModelConfig, RLFleetConfig
from rlfleet.data import PromptStream, load_prompt_dataset
from rlfleet.models import EOS_ID, IM_START_ID, load_causal_lm, load_tokenizer

GEN = GenerationConfig(num_generations=4, max_completion_length=16, temperature=1.0)
LOGGER = "rlfleet.generation.generator"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin:tiny")


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    threads = torch.get_num_threads()
    yield Engine(ModelConfig(name_or_path=tiny_model_path), GEN, seed=0)
    torch.set_num_threads(threads)  # vLLM sets torch to 1 thread for serving; later modules get theirs back


def records(task: str, n: int) -> list[dict]:
    return PromptStream(load_prompt_dataset(DataConfig(dataset=f"builtin:{task}"), "test"), seed=0).next_batch(n)


def even_share(prompts, completions, completion_ids=None, **kwargs):
    """Share of even token ids: varies between samples of the random model."""
    return [sum(t % 2 == 0 for t in ids) / len(ids) for ids in completion_ids]


# ---------------------------------------------------------------------------------------------------------------
# Real engine
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.vllm
def test_groups_have_consistent_shapes_ids_rewards_and_logprobs(engine, tokenizer, tiny_model_path):
    """target_length (standard prompts, the task's default reward): prompt ids are the prompt's bytes, padding is 0,
    reward = min(L, N) / max(L, N) recomputed from the lengths, and behaviour_logprobs equal HF's log_softmax(logits / T)
    at the group's tokens (so the rows line up with the tokens and the prompt)."""
    cfg = RLFleetConfig(generation=GEN, data=DataConfig(dataset="builtin:target_length"))
    gen = Generator.from_config(engine, tokenizer, cfg)
    batch = records("target_length", 3)
    groups, stats = gen.generate(batch)
    assert [g.prompt_id for g in groups] == [r["prompt_id"] for r in batch]
    hf = load_causal_lm(tiny_model_path).eval()
    for g, record in zip(groups, batch):
        assert g.prompt_token_ids.tolist() == list(record["prompt"].encode())
        assert g.size == 4 and g.completion_ids.shape == (4, g.completion_lengths.max())
        assert g.policy_version == engine.version == 0
        n = record["target_length"]
        expected = [min(L, n) / max(L, n) for L in g.completion_lengths]
        np.testing.assert_allclose(g.rewards, expected, rtol=1e-6)
        for row, L in enumerate(g.completion_lengths):
            assert not g.completion_ids[row, L:].any() and not g.behaviour_logprobs[row, L:].any()
            tokens = g.completion_ids[row, :L].tolist()
            assert g.truncated[row] == (tokens[-1] != EOS_ID)
            ids = torch.tensor([g.prompt_token_ids.tolist() + tokens])
            with torch.no_grad():
                logits = hf(ids).logits[0, len(g.prompt_token_ids) - 1:-1] / GEN.temperature  # [L, V]
            ref = logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
            assert (torch.from_numpy(g.behaviour_logprobs[row, :L]) - ref).abs().max() < 1e-4
    assert stats["gen/groups"] == 3 and stats["errors/reward"] == 0 and stats["gen/dropped_groups"] == 0
    assert stats["gen/tokens"] == sum(g.num_tokens for g in groups)
    assert stats["gen/truncated_frac"] == np.mean([g.truncated for g in groups])
    assert stats["reward/mean"] == pytest.approx(np.mean([g.rewards for g in groups]), rel=1e-6)
    assert stats["policy_version"] == 0 and stats["gen/tokens_per_s"] > 0


@pytest.mark.vllm
def test_conversational_prompts_use_the_chat_template(engine, tokenizer):
    """char_count prompts are message lists: the prompt ids are the template's
    <|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n, and reward functions receive TRL's
    conversational completions, the prompts and each column repeated per completion, and the completion ids."""
    seen = {}

    def recorder(prompts, completions, completion_ids=None, **columns):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, columns=columns)
        return [0.0] * len(completions)

    gen = Generator(engine, tokenizer, GEN, AlgorithmConfig(), [recorder])
    batch = records("char_count", 2)
    groups, _ = gen.generate(batch)
    for g, record in zip(groups, batch):
        content = record["prompt"][0]["content"].encode()
        expected = [IM_START_ID, *b"user\n", *content, EOS_ID, *b"\n", IM_START_ID, *b"assistant\n"]
        assert g.prompt_token_ids.tolist() == expected
    assert seen["prompts"] == [r["prompt"] for r in batch for _ in range(4)]
    assert seen["columns"] == {"target": [r["target"] for r in batch for _ in range(4)],
                               "prompt_id": [r["prompt_id"] for r in batch for _ in range(4)]}
    tokens = [row for g in groups for row in g.completion_token_lists]
    assert seen["completion_ids"] == tokens
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    assert seen["completions"] == [[{"role": "assistant", "content": t}] for t in texts]


@pytest.mark.vllm
def test_gfpo_keeps_top_k_and_computes_advantages_on_the_kept_rows(engine, tokenizer):
    """A TRL-signature filter (no completion_lengths) scoring by reward keeps the 2 best of 4: the kept rewards are
    the 2 largest the filter saw, each matches its own tokens, and A = group_advantages(kept rewards); for two
    kept rewards r1 >= r2, d = r1 - r2: mean r2 + d/2, unbiased std d / sqrt(2), so A = +-(d/2) / (d/sqrt(2) + 1e-4)
    whatever the full group's mean."""
    seen = []

    def by_reward(group_completions, group_rewards):
        seen.append(np.array(group_rewards))
        return group_rewards

    alg = AlgorithmConfig(num_remains_in_group=2, group_filter_func="by_reward")
    gen = Generator(engine, tokenizer, GEN, alg, [even_share], group_filter=by_reward)
    groups, stats = gen.generate(records("target_length", 4))
    [all_rewards] = seen  # [4 groups, 4 samples]
    assert all_rewards.shape == (4, 4) and stats["gen/groups"] == 4
    kept = np.stack([g.rewards for g in groups])  # [4, 2]
    np.testing.assert_allclose(kept, -np.sort(-all_rewards, axis=1)[:, :2], rtol=1e-6)
    for g in groups:
        assert g.size == 2
        np.testing.assert_allclose(g.rewards, even_share(None, None, g.completion_token_lists), rtol=1e-6)
    expected = group_advantages(kept, "group")
    np.testing.assert_allclose(np.stack([g.advantages for g in groups]), expected.advantages, rtol=1e-6)
    d = kept[:, 0] - kept[:, 1]  # [4] >= 0: best first
    assert (d > 0).any()
    a = (d / 2) / (d / np.sqrt(2) + 1e-4)  # [4]  (0 when d = 0: zero-std group)
    np.testing.assert_allclose(np.stack([g.advantages for g in groups]), np.stack([a, -a], axis=1), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Fake engine: error paths and exact GFPO arithmetic
# ---------------------------------------------------------------------------------------------------------------


class FakeEngine:
    """Sample j of every prompt is token 97 + j repeated LENGTHS[j] times, log-prob -0.5 each, ended by EOS."""

    LENGTHS = [5, 2, 7, 3]
    version = 7
    max_model_len = 64

    def sample(self, prompt_token_ids, n):
        return [[Completion([97 + j] * (L - 1) + [EOS_ID], [-0.5] * L, False) for j, L in enumerate(self.LENGTHS)]
                for _ in prompt_token_ids]


def fake_records(n, **columns):
    return [{"prompt": f"p{i}", "prompt_id": str(i), **{k: v[i] for k, v in columns.items()}} for i in range(n)]


def by_length(prompts, completions, completion_ids=None, **kwargs):
    return [float(len(ids)) for ids in completion_ids]


def test_fake_engine_group_arithmetic(tokenizer):
    """Rewards = lengths [5, 2, 7, 3]: mean 4.25, unbiased std sqrt(14.75 / 3) = 2.217356,
    A = [0.75, -2.25, 2.75, -1.25] / (2.217356 + 1e-4) = [0.338225, -1.014676, 1.240160, -0.563709]."""
    groups, stats = Generator(FakeEngine(), tokenizer, GEN, AlgorithmConfig(), [by_length]).generate(fake_records(2))
    for g in groups:
        np.testing.assert_allclose(g.advantages, [0.338225, -1.014676, 1.240160, -0.563709], atol=1e-5)
        assert g.reward_std == pytest.approx(2.217356, abs=1e-5) and g.policy_version == 7
        assert g.completion_ids.shape == (4, 7) and g.completion_lengths.tolist() == [5, 2, 7, 3]
        assert g.completion_ids[1].tolist() == [98, EOS_ID, 0, 0, 0, 0, 0]
        assert g.behaviour_logprobs[1].tolist() == [-0.5, -0.5, 0, 0, 0, 0, 0]
    assert stats["gen/tokens"] == 34 and stats["reward/mean"] == 4.25 and stats["reward/by_length/mean"] == 4.25
    # two groups of lengths [5, 2, 7, 3]: n 8, sum 34, sum of squares 2 * 87
    assert (stats["rewards/by_length/n"], stats["rewards/by_length/sum"], stats["rewards/by_length/sum_sq"]) == \
        (8.0, 34.0, 174.0)


def test_gfpo_shortest_from_config_gets_lengths(tokenizer):
    """Built-in 'shortest' (score = -length) with k = 2 keeps samples 1 and 3 (lengths 2, 3), best first. Reward
    target_length with N = 2: min(L, 2) / max(L, 2) = [1, 2/3] on the kept rows: mean 5/6, std (1/3) / sqrt(2) =
    0.235702, A = [1/6, -1/6] / (0.235702 + 1e-4) = [0.706807, -0.706807]."""
    cfg = RLFleetConfig(generation=GEN, algorithm=AlgorithmConfig(
        reward_funcs=["target_length"], num_remains_in_group=2, group_filter_func="shortest"))
    groups, _ = Generator.from_config(FakeEngine(), tokenizer, cfg).generate(fake_records(3, target_length=[2] * 3))
    for g in groups:
        assert g.completion_lengths.tolist() == [2, 3] and g.completion_ids.shape == (2, 3)
        np.testing.assert_allclose(g.rewards, [1, 2 / 3], rtol=1e-6)
        np.testing.assert_allclose(g.advantages, [0.706807, -0.706807], atol=1e-6)


def flaky(prompts, completions, completion_ids=None, *, mode, **kwargs):
    """Misbehaves per record's ``mode`` column: raise / short (one value missing) / nan / inf / none / ok."""
    if "raise" in mode:
        raise RuntimeError("boom")
    out = [1.0] * len(completions)
    for i, m in enumerate(mode):
        out[i] = {"nan": float("nan"), "inf": float("inf"), "none": None}.get(m, out[i])
    return out[:-1] if "short" in mode else out


@pytest.mark.parametrize(
    "modes, dropped",
    [
        (["ok", "raise", "ok"], [0, 1, 2]),  # raising spoils the whole call
        (["ok", "short", "ok"], [0, 1, 2]),  # so does a wrong length
        (["ok", "nan", "ok"], [1]),  # NaN / inf spoil only their group
        (["inf", "ok", "ok"], [0]),
        (["none", "ok", "ok"], []),  # None is "unscored", not an error
    ],
)
def test_reward_errors_drop_groups_count_and_continue(tokenizer, caplog, modes, dropped):
    """Rewards are by_length + flaky = L + 1 = [6, 3, 8, 4]; a group flaky leaves unscored (None) gets L alone."""
    gen = Generator(FakeEngine(), tokenizer, GEN, AlgorithmConfig(), [by_length, flaky])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(2):  # two failing calls: counted twice, logged once
            groups, stats = gen.generate(fake_records(3, mode=modes))
            assert [g.prompt_id for g in groups] == [str(i) for i in range(3) if i not in dropped]
            assert stats["errors/reward"] == stats["gen/dropped_groups"] == len(dropped)
            for g in groups:
                expected = [5, 2, 7, 3] if modes[int(g.prompt_id)] == "none" else [6, 3, 8, 4]
                assert g.rewards.tolist() == expected
        groups, stats = gen.generate(fake_records(3, mode=["ok"] * 3))  # the generator goes on
    assert len(groups) == 3 and stats["errors/reward"] == 0
    logged = [r for r in caplog.records if "flaky" in r.getMessage()]
    assert len(logged) == (1 if dropped else 0)


def test_filter_errors_drop_groups(tokenizer, caplog):
    """A filter that returns NaN for group 1 drops group 1 only; one that raises drops all; -inf is a valid score."""

    def nan_for_p1(group_completions, group_rewards):
        return [[float("nan")] * 4 if i == 1 else [0, -np.inf, 1, 2] for i in range(len(group_completions))]

    def broken(group_completions, group_rewards):
        raise KeyError("nope")

    alg = AlgorithmConfig(num_remains_in_group=2, group_filter_func="x")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        groups, stats = Generator(FakeEngine(), tokenizer, GEN, alg, [by_length], group_filter=nan_for_p1).generate(
            fake_records(3))
        assert [g.prompt_id for g in groups] == ["0", "2"] and stats["errors/reward"] == 1
        assert all(g.completion_lengths.tolist() == [3, 7] for g in groups)  # scores [0, -inf, 1, 2]: keep 3, 2
        groups, stats = Generator(FakeEngine(), tokenizer, GEN, alg, [by_length], group_filter=broken).generate(
            fake_records(3))
        assert groups == [] and stats["errors/reward"] == 3 and stats["gen/groups"] == 0
    assert sum("nan_for_p1" in r.getMessage() for r in caplog.records) == 1
    assert sum("broken" in r.getMessage() for r in caplog.records) == 1


def test_too_long_prompts_are_skipped_and_counted(tokenizer):
    batch = fake_records(2)
    batch[0]["prompt"] = "x" * 64  # 64 tokens >= max_model_len 64
    groups, stats = Generator(FakeEngine(), tokenizer, GEN, AlgorithmConfig(), [by_length]).generate(batch)
    assert [g.prompt_id for g in groups] == ["1"]
    assert stats["gen/prompts_too_long"] == 1 and stats["gen/dropped_groups"] == 1 and stats["errors/reward"] == 0


def test_no_usable_prompts_give_no_groups_and_call_no_function(tokenizer):
    calls = []

    def record_call(prompts, completions, **kwargs):
        calls.append(len(completions))
        return []

    groups, stats = Generator(FakeEngine(), tokenizer, GEN, AlgorithmConfig(), [record_call]).generate([])
    assert groups == [] and calls == [] and stats["gen/groups"] == 0 and stats["errors/reward"] == 0


class VersionedEngine(FakeEngine):
    """FakeEngine's completions sampled across a load from version 7 to 8 (continuous generation): sample j's
    first j + 1 tokens (all of them if fewer) at version 7, the rest at 8."""

    version = 8

    def sample(self, prompt_token_ids, n):
        return [[Completion(c.token_ids, c.logprobs, c.truncated,
                            versions=[7] * min(j + 1, len(c.token_ids)) + [8] * max(len(c.token_ids) - j - 1, 0))
                 for j, c in enumerate(group)] for group in super().sample(prompt_token_ids, n)]


def test_groups_keep_each_tokens_version_and_take_the_oldest(tokenizer):
    """Lengths [5, 2, 7, 3]: samples 1 (2 tokens) and 3 (3) are all version 7, sample 2 has 3 tokens at 7, so every
    group's
    oldest token is 7 (its policy_version) and it spans 8 - 7 = 1 version; padding carries the oldest."""
    groups, stats = Generator(VersionedEngine(), tokenizer, GEN, AlgorithmConfig(), [by_length]).generate(
        fake_records(2))
    for g in groups:
        assert g.policy_version == 7 and g.version_span == 1
        assert g.token_versions[0].tolist() == [7, 8, 8, 8, 8, 7, 7]
        assert g.token_versions[1].tolist() == [7, 7, 7, 7, 7, 7, 7]
        assert g.token_versions[2].tolist() == [7, 7, 7, 8, 8, 8, 8]
    assert stats["gen/version_span_mean"] == 1.0 and stats["gen/version_span_max"] == 1.0
    assert stats["policy_version"] == 8  # the engine's weights now (the pool's view of the member)
    # the batched engine's completions carry no versions: one version, no per-token array
    plain, stats = Generator(FakeEngine(), tokenizer, GEN, AlgorithmConfig(), [by_length]).generate(fake_records(1))
    assert plain[0].token_versions is None and plain[0].policy_version == 7 and stats["gen/version_span_max"] == 0


class StreamingEngine(FakeEngine):
    """FakeEngine's groups through a continuous engine's ``submit``: the groups of the prompts in ``at_once`` are
    done when submitted, the others only when the test resolves them (``waiting``)."""

    def __init__(self, at_once: set[int]):
        self.at_once, self.waiting, self.submitted = at_once, [], 0

    def submit(self, prompt_token_ids, n):
        from concurrent.futures import Future

        done, index = Future(), self.submitted
        self.submitted += 1
        group = self.sample([prompt_token_ids], n)[0]
        if index in self.at_once:
            done.set_result(group)
        else:
            self.waiting.append((done, group))
        return done


def test_each_group_is_handed_on_as_it_is_made_and_those_that_end_together_are_scored_together(tokenizer):
    """Three prompts on a continuous engine: the groups of prompts 0 and 2 are done at once, prompt 1's only after
    the first handing-on (the test resolves it between the two, so the order is fixed, not timed). The generator
    hands on groups 0 and 2 together (and says it settled prompts 0 and 2), scored in one call of the reward function, then group 1 alone: two calls,
    the stats of each handing-on counting its own groups, and every group as :meth:`generate` makes it (rewards
    = the lengths [5, 2, 7, 3])."""
    calls, shipped = [], []
    engine = StreamingEngine(at_once={0, 2})

    def counted(prompts, completions, completion_ids=None, **kwargs):
        calls.append(len(completions))
        return by_length(prompts, completions, completion_ids)

    settled = []
    for prompts, groups, stats in Generator(engine, tokenizer, GEN, AlgorithmConfig(), [counted]).generate_each(
            fake_records(3)):
        settled.append(prompts)
        shipped.append(([g.prompt_id for g in groups], stats))
        for done, group in engine.waiting:  # prompt 1 ends once the first groups are on their way
            done.set_result(group)
        engine.waiting = []
    assert [ids for ids, _ in shipped] == [["0", "2"], ["1"]] and settled == [["0", "2"], ["1"]]
    assert calls == [8, 4]
    assert [stats["gen/groups"] for _, stats in shipped] == [2, 1]
    assert [stats["gen/tokens"] for _, stats in shipped] == [2 * 17, 17]
    assert all(stats["reward/mean"] == 4.25 for _, stats in shipped)
    assert engine.submitted == 3  # every prompt submitted before any group was waited for
