"""Dynamic sampling, overlong handling and top-K parsing (no server: a fake generate callback).

The fake generate stands in for ``RolloutGenerator.generate``: prompt ``[i]`` gets ``n`` samples whose
rewards and lengths come from the table ``PLAN[i]``; the expected batches, rounds and rewards
below are worked out by hand from those tables.
"""

from __future__ import annotations

import pytest

from drpo_megatron.config import ConfigError, load_config
from drpo_megatron.config import RolloutConfig
from drpo_megatron.rollout.engine import Sample, parse_sample
from drpo_megatron.rollout.sampling import (DynamicSamplingExhausted, apply_overlong,
                                            generate_scored_groups, overlong_penalty)
from drpo_megatron.rollout.server import ServerError

N = 3
MAX_NEW = 8


def Cfg(**kw) -> RolloutConfig:  # noqa: N802 - reads like the config it builds
    """The real rollout config with this file's small defaults (filtering on)."""
    return RolloutConfig(**{"prompts_per_step": 3, "samples_per_prompt": N,
                            "max_new_tokens": MAX_NEW, "dynamic_filter": True, **kw})


MIXED = ([1.0, 0.0, 1.0], [2, 3, 2])
SAME0 = ([0.0, 0.0, 0.0], [2, 2, 2])
SAME1 = ([1.0, 1.0, 1.0], [2, 2, 2])


class Fake:
    """Prompts are ``[i]`` for i = 0, 1, ...; ``plan[i]`` = (rewards, response lengths)."""

    def __init__(self, plan):
        self.plan = plan
        self.cursor = 0
        self.calls: list[tuple[list[int], int]] = []  # (prompt indices, first_group) per round

    def next_prompts(self, k):
        idx = list(range(self.cursor, self.cursor + k))
        self.cursor += k
        return [[i] for i in idx], [str(i) for i in idx]

    def generate(self, prompts, answers, first_group):
        self.calls.append(([p[0] for p in prompts], first_group))
        out = []
        for g, p in enumerate(prompts):
            _, lengths = self.plan[p[0]]
            for j in range(N):
                L = lengths[j]
                out.append(Sample(group_id=first_group + g, prompt_ids=list(p),
                                  response_ids=[5] * L, rollout_logp=[-0.5] * L, text="",
                                  finish_reason="length" if L == MAX_NEW else "stop",
                                  weight_version="0", answer=answers[g], meta={"j": j}))
        return out

    def score(self, samples):
        for s in samples:
            s.reward = self.plan[s.prompt_ids[0]][0][s.meta["j"]]

    def run(self, cfg):
        return generate_scored_groups(cfg, next_prompts=self.next_prompts, generate=self.generate,
                                      score=self.score)


def _prompts_of(batch):
    return [batch[g * N].prompt_ids[0] for g in range(len(batch) // N)]


def _check_group_major(batch, groups):
    assert len(batch) == groups * N
    assert [s.group_id for s in batch] == [g for g in range(groups) for _ in range(N)]
    for g in range(groups):
        assert len({s.prompt_ids[0] for s in batch[g * N:(g + 1) * N]}) == 1


def test_without_filter_one_round_keeps_every_group():
    fake = Fake([MIXED, SAME0, SAME1])
    batch, m = fake.run(Cfg(dynamic_filter=False, oversample_factor=3.0))
    _check_group_major(batch, 3)
    assert _prompts_of(batch) == [0, 1, 2]
    assert fake.calls == [([0, 1, 2], 0)]  # oversampling applies only with the filter
    assert m["rollout/generation_rounds"] == 1 and m["rollout/prompts_generated"] == 3
    assert m["rollout/filtered_groups"] == 0 and m["rollout/kept_groups"] == 3


def test_all_equal_groups_dropped_and_batch_filled_over_rounds():
    # round 1: prompts 0,1,2 -> keep 0, 2 (1 is all-0); round 2: prompt 3 (all-1) dropped;
    # round 3: prompt 4 kept -> batch = prompts 0, 2, 4
    fake = Fake([MIXED, SAME0, MIXED, SAME1, MIXED, MIXED])
    batch, m = fake.run(Cfg())
    _check_group_major(batch, 3)
    assert _prompts_of(batch) == [0, 2, 4]
    assert [s.meta["generated_group"] for s in batch[::N]] == [0, 2, 4]
    # each round asks for the missing groups only, with distinct step-local group indices
    assert fake.calls == [([0, 1, 2], 0), ([3], 3), ([4], 4)]
    assert m["rollout/generation_rounds"] == 3 and m["rollout/prompts_generated"] == 5
    assert m["rollout/filtered_groups"] == 2 and m["rollout/kept_groups"] == 3
    assert m["rollout/filled_groups"] == 0
    assert all(min(g) != max(g) for g in
               ([s.reward for s in batch[i * N:(i + 1) * N]] for i in range(3)))


def test_oversampling_requests_ceil_factor_and_discards_surplus():
    # need 2, factor 1.5 -> ceil(3) prompts: 0 (mixed), 1 (same), 2 (mixed) -> done in one round
    fake = Fake([MIXED, SAME1, MIXED, MIXED])
    batch, m = fake.run(Cfg(prompts_per_step=2, oversample_factor=1.5))
    assert fake.calls == [([0, 1, 2], 0)]
    assert _prompts_of(batch) == [0, 2]
    # need 2, factor 2 -> 4 prompts, three informative: the first two are kept
    fake = Fake([MIXED, SAME1, MIXED, MIXED])
    batch, m = fake.run(Cfg(prompts_per_step=2, oversample_factor=2.0))
    assert fake.calls == [([0, 1, 2, 3], 0)] and _prompts_of(batch) == [0, 2]
    assert m["rollout/kept_groups"] == 2 and m["rollout/filtered_groups"] == 1
    # a second round asks for ceil(1.5 * 1) = 2 prompts when one group is missing
    fake = Fake([MIXED, SAME1, SAME0, SAME0, MIXED, MIXED])
    batch, m = fake.run(Cfg(prompts_per_step=2, oversample_factor=1.5))
    assert fake.calls == [([0, 1, 2], 0), ([3, 4], 3)] and _prompts_of(batch) == [0, 4]


def test_max_rounds_exhausted_raises_with_counts():
    fake = Fake([SAME0] * 10)
    with pytest.raises(DynamicSamplingExhausted,
                       match=r"0 of rollout.prompts_per_step=3 groups .*max_rounds=2 rounds \(6 "
                             r"prompts generated, 6 groups had all-equal rewards\)"):
        fake.run(Cfg(max_rounds=2))
    assert len(fake.calls) == 2


def test_max_rounds_exhausted_fill_tops_up_with_equal_groups():
    fake = Fake([SAME0, MIXED, SAME1, SAME0, SAME1, SAME1])
    batch, m = fake.run(Cfg(max_rounds=2, on_exhausted="fill"))
    # round 1: 0 dropped, 1 kept, 2 dropped; round 2 (2 missing): 3, 4 dropped -> fill with the
    # first filtered groups in generation order: 0, 2
    _check_group_major(batch, 3)
    assert _prompts_of(batch) == [1, 0, 2]
    assert m["rollout/kept_groups"] == 1 and m["rollout/filled_groups"] == 2
    assert m["rollout/filtered_groups"] == 4 and m["rollout/generation_rounds"] == 2


def test_unlimited_rounds_keep_going():
    fake = Fake([SAME0] * 11 + [MIXED])
    batch, m = fake.run(Cfg(prompts_per_step=1, max_rounds=0))
    assert _prompts_of(batch) == [11] and m["rollout/generation_rounds"] == 12


def test_generate_must_return_group_major_samples():
    fake = Fake([MIXED] * 6)
    bad = lambda p, a, first: fake.generate(p, a, first)[:-1]  # noqa: E731
    with pytest.raises(ValueError, match="returned 8 samples for 3 prompts x n=3"):
        generate_scored_groups(Cfg(), next_prompts=fake.next_prompts, generate=bad,
                               score=fake.score)
    shuffled = lambda p, a, first: list(reversed(fake.generate(p, a, first)))  # noqa: E731
    with pytest.raises(ValueError, match="out of group-major order"):
        generate_scored_groups(Cfg(), next_prompts=fake.next_prompts, generate=shuffled,
                               score=fake.score)


# ------------------------------------------------------------------ overlong
def test_overlong_penalty_values():
    # L_max 8, buffer 4, penalty 1: free up to 4 tokens, then -1/4 per token
    got = [overlong_penalty(L, max_new_tokens=8, buffer=4, penalty=1.0) for L in range(0, 9)]
    assert got == [0, 0, 0, 0, 0, -0.25, -0.5, -0.75, -1.0]
    assert overlong_penalty(10, max_new_tokens=10, buffer=5, penalty=0.5) == -0.5
    assert overlong_penalty(8, max_new_tokens=10, buffer=5, penalty=0.5) == pytest.approx(-0.3)


def _scored(lengths, rewards):
    return [Sample(group_id=0, prompt_ids=[1], response_ids=[5] * L, rollout_logp=[-1.0] * L,
                   text="", finish_reason="length" if L == MAX_NEW else "stop",
                   weight_version="0", reward=r) for L, r in zip(lengths, rewards)]


def test_overlong_modes_hand_computed():
    lengths, rewards = [3, 5, 6, 8], [1.0, 1.0, 0.0, 1.0]
    s = _scored(lengths, rewards)
    apply_overlong(s, Cfg(overlong="keep"))
    assert [x.reward for x in s] == rewards and all(x.in_loss for x in s)

    s = _scored(lengths, rewards)
    apply_overlong(s, Cfg(overlong="filter"))
    assert [x.reward for x in s] == rewards
    assert [x.in_loss for x in s] == [True, True, True, False]  # only the truncated one

    s = _scored(lengths, rewards)
    apply_overlong(s, Cfg(overlong="penalty", overlong_buffer=4, overlong_penalty=1.0))
    assert [x.reward for x in s] == [1.0, 0.75, -0.5, 0.0]
    assert all(x.in_loss for x in s)
    s = _scored(lengths, rewards)
    apply_overlong(s, Cfg(overlong="penalty", overlong_buffer=2, overlong_penalty=0.5))
    assert [x.reward for x in s] == [1.0, 1.0, 0.0, 0.5]  # 7 -> -0.25 would be next


def test_penalty_is_applied_before_the_filter_and_logged():
    # all answers correct (1, 1, 1) but lengths 2, 6, 8: with the penalty the group's final
    # rewards are 1, 0.5, 0 -> informative; without it the group is all-equal and dropped
    plan = [([1.0, 1.0, 1.0], [2, 6, 8]), MIXED, MIXED]
    batch, m = Fake(plan).run(Cfg(prompts_per_step=1, overlong="penalty"))
    assert _prompts_of(batch) == [0]
    assert [s.reward for s in batch] == [1.0, 0.5, 0.0]
    assert m["rollout/overlong_penalty_mean"] == pytest.approx((0 - 0.5 - 1.0) / 3)
    batch, m = Fake(plan).run(Cfg(prompts_per_step=1, overlong="keep"))
    assert _prompts_of(batch) == [1] and m["rollout/filtered_groups"] == 1
    batch, m = Fake(plan).run(Cfg(prompts_per_step=2, overlong="filter", dynamic_filter=False))
    assert [s.in_loss for s in batch] == [True, True, False, True, True, True]
    assert m["rollout/overlong_excluded_frac"] == pytest.approx(1 / 6)


def test_config_validation():
    cfg = load_config(overrides={"rollout": {"dynamic_filter": True, "oversample_factor": 1.5,
                                             "overlong": "penalty", "overlong_buffer": 4}})
    assert cfg.rollout.dynamic_filter and cfg.rollout.max_rounds == 8
    for bad, match in [({"oversample_factor": 0.5}, "oversample_factor=0.5 must be >= 1"),
                       ({"max_rounds": -1}, "max_rounds=-1 must be >= 0"),
                       ({"on_exhausted": "skip"}, "on_exhausted='skip'"),
                       ({"overlong": "drop"}, "overlong='drop': choose one of"),
                       ({"overlong": "penalty", "overlong_buffer": 0}, "overlong_buffer=0"),
                       ({"overlong": "penalty", "overlong_buffer": 17}, "overlong_buffer=17")]:
        with pytest.raises(ConfigError, match=match):
            load_config(overrides={"rollout": bad})


# ------------------------------------------------------------------ top-K parsing
def _out(k=2, **meta):
    top = [[[-0.1, 7, None], [-2.5, 9, None]], [[-0.3, 4, None], [-0.2, 8, None]]]
    m = {"output_token_logprobs": [[-0.1, 7, None], [-0.2, 8, None]],
         "output_top_logprobs": [row[:k] for row in top], "finish_reason": {"type": "stop"},
         "weight_version": "2"}
    m.update(meta)
    return {"text": "x", "output_ids": [7, 8], "meta_info": m}


def test_parse_top_logprobs():
    s = parse_sample(_out(), group_id=0, prompt_ids=[1], answer="", server_name="s", top_k=2)
    assert s.topk_ids == [[7, 9], [4, 8]] and s.topk_logp == [[-0.1, -2.5], [-0.3, -0.2]]
    assert s.weight_version == "2"
    s = parse_sample(_out(), group_id=0, prompt_ids=[1], answer="", server_name="s")
    assert s.topk_ids is None and s.topk_logp is None  # not requested: not parsed


@pytest.mark.parametrize("meta,match", [
    ({"output_top_logprobs": None}, "lacks meta_info.output_top_logprobs"),
    ({"output_top_logprobs": [[[-0.1, 7, None], [-2.5, 9, None]]]},
     r"2 output_ids but 1 top-K log-prob positions \(truncated response\)"),
    ({"output_top_logprobs": [[[-0.1, 7, None]], [[-0.3, 4, None]]]},
     "position 0 hold 1 entries, expected top_logprobs_num=2"),
    ({"output_top_logprobs": [[[-0.1, 7, None], [-2.5, "9", None]],
                              [[-0.3, 4, None], [-0.2, 8, None]]]}, "is not \\[logprob, token_id"),
    ({"output_top_logprobs": [[[-0.1, 7, None], [-2.5, 9, None]], "oops"]},
     "position 1 hold str entries"),
])
def test_malformed_top_logprobs_raise(meta, match):
    with pytest.raises(ServerError, match=match):
        parse_sample(_out(**meta), group_id=3, prompt_ids=[1], answer="", server_name="s-0",
                     top_k=2)


def test_rollout_metrics_sampled_in_topk_frac():
    from drpo_megatron.rollout.engine import rollout_metrics

    s = parse_sample(_out(), group_id=0, prompt_ids=[1], answer="", server_name="s", top_k=2)
    # tokens 7, 8 are in their rows [7, 9], [4, 8]
    assert rollout_metrics([s])["rollout/sampled_in_topk_frac"] == 1.0
    s.topk_ids = [[7, 9], [4, 5]]
    assert rollout_metrics([s])["rollout/sampled_in_topk_frac"] == 0.5
    s.topk_ids = None
    assert "rollout/sampled_in_topk_frac" not in rollout_metrics([s])
