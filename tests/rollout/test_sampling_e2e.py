"""Real SGLang: top-K rollout log-probs and a DPPO top-K step with dynamic sampling, end to end.

1. A real CPU server answers ``top_logprobs_num = K``: ``engine.generate_groups(top_k=K)`` parses
   K entries per response token; they are sorted, distinct, and the sampled token's entry (when
   it is among them) equals its µ from ``output_token_logprobs`` (same tempered distribution).
2. ``drpo train`` for one step with ``loss.name: dppo_topk_tv`` (top-K requested from SGLang,
   π's top-K log-probs in the actor), ``rollout.dynamic_filter`` and ``rollout.overlong:
   penalty``: the step trains (finite loss, top-K TV metrics), the batch holds exactly
   prompts_per_step contiguous groups, and each recorded reward is the math-verify reward (0/1)
   plus DAPO's overlong penalty recomputed here from the response length.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

PROMPTS, N, MAX_NEW, BUFFER, PENALTY = 4, 4, 12, 6, 0.5


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, drpo_train):
    root = tmp_path_factory.mktemp("sampling_e2e")
    cfg = {
        "model": {"cache_dir": str(root / "cache"), "tiny": {"sft_steps": 60}},
        "rollout": {"prompts_per_step": PROMPTS, "samples_per_prompt": N,
                    "max_new_tokens": MAX_NEW, "dynamic_filter": True, "oversample_factor": 1.5,
                    "max_rounds": 3, "on_exhausted": "fill", "overlong": "penalty",
                    "overlong_buffer": BUFFER, "overlong_penalty": PENALTY},
        "loss": {"name": "dppo_topk_tv", "params": {"delta": 0.15, "top_k": 20},
                 "horizon": MAX_NEW},
        "optim": {"updates_per_rollout": 2},
        "train": {"max_steps": 1, "eval_every": 0},
        "task": {"num_eval": 8},
    }
    return drpo_train(cfg, root, timeout=900)


def _policy_dir(run_dir: Path) -> Path:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    return next(Path(cfg["model"]["cache_dir"]).glob("tiny-qwen3-moe-*"))


def test_dppo_topk_step_with_dynamic_sampling_and_overlong_penalty(run_dir):
    from drpo_megatron.rollout.sampling import overlong_penalty

    (m,) = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(l)["step"] == 1]
    assert math.isfinite(m["loss/policy_loss"]) and math.isfinite(m["loss/grad_norm"])
    assert m["loss/num_tokens"] > 0 and "loss/clipfrac_adv_pos" in m  # the top-K TV mask ran
    assert m["rollout/kept_groups"] + m["rollout/filled_groups"] == PROMPTS
    assert 1 <= m["rollout/generation_rounds"] <= 3
    assert m["rollout/prompts_generated"] >= PROMPTS
    assert m["perf/rollout_time_s"] > 0 and m["perf/reward_time_s"] >= 0
    rows = [json.loads(l) for l in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == PROMPTS * N
    assert [r["group_id"] for r in rows] == [g for g in range(PROMPTS) for _ in range(N)]
    assert {r["weight_version"] for r in rows} == {"0"}
    for r in rows:
        pen = overlong_penalty(len(r["response_ids"]), max_new_tokens=MAX_NEW, buffer=BUFFER,
                               penalty=PENALTY)
        assert r["meta"]["overlong_penalty"] == pytest.approx(pen)
        assert r["reward"] - pen in (0.0, 1.0)  # the math-verify reward underneath
    if m["rollout/filled_groups"] == 0:  # every kept group has non-equal rewards
        for g in range(PROMPTS):
            rewards = [r["reward"] for r in rows[g * N:(g + 1) * N]]
            assert min(rewards) != max(rewards)


def test_real_server_top_logprobs_format(run_dir, tmp_path):
    from drpo_megatron.models.tiny import build_tokenizer, prompt_ids
    from drpo_megatron.rollout.engine import generate_groups
    from drpo_megatron.rollout.server import ServerConfig, SGLangServer

    tok = build_tokenizer()
    prompts = [prompt_ids(tok, q) for q in ("12+30=", "7-9=")]
    K = 20
    with SGLangServer(_policy_dir(run_dir), ServerConfig(), tmp_path) as srv:
        srv.start().wait_healthy()
        by_temp = {t: generate_groups(srv, prompts, ["42", "-2"], n=2, temperature=t, top_p=1.0,
                                      max_new_tokens=8, top_k=K) for t in (1.0, 0.7)}
    for temperature, samples in by_temp.items():
        assert len(samples) == 4
        hits = 0
        for s in samples:
            assert len(s.topk_ids) == len(s.topk_logp) == len(s.response_ids) > 0
            for tok_id, mu, ids, lps in zip(s.response_ids, s.rollout_logp, s.topk_ids,
                                            s.topk_logp):
                assert len(ids) == len(set(ids)) == K
                assert lps == sorted(lps, reverse=True)
                assert sum(math.exp(v) for v in lps) <= 1 + 1e-3
                if tok_id in ids:  # same tempered distribution as µ
                    hits += 1
                    assert lps[ids.index(tok_id)] == pytest.approx(mu, abs=1e-6), temperature
        assert hits > 0
