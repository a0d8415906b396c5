"""The loop's reward (``reward.kind: function`` / ``math_verify``): real worker processes, real
time limits (SIGKILL of a worker past its deadline), every failure counted or raised by name."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from drpo_megatron.config import ConfigError, load_config
from drpo_megatron.rewards import scorer as scorer_mod
from drpo_megatron.rewards.config import RewardConfig
from drpo_megatron.rewards.math_reward import boxed_math_reward
from drpo_megatron.rewards.pool import RewardError
from drpo_megatron.rewards.scorer import INFO_KEY, RewardScorer, attach_task
from drpo_megatron.rollout.engine import Sample

FNS = Path(__file__).resolve().parent / "reward_fns.py"
# worker start-up (a fresh interpreter importing the function) on a loaded 2-core machine
STARTUP_S = 60.0


def spec(name: str) -> str:
    return f"{FNS}:{name}"


def sample(text: str, answer: str = "1", group: int = 0, **task) -> Sample:
    s = Sample(group_id=group, prompt_ids=[1], response_ids=[2], rollout_logp=[0.0], text=text,
               finish_reason="stop", weight_version="0", answer=answer)
    s.meta["prompt"] = f"prompt of {text}"
    s.meta["task"] = {"answer": answer, **task}
    return s


@pytest.fixture
def make():
    made = []

    def _make(**kw) -> RewardScorer:
        kw.setdefault("workers", 1)
        if "function" in kw:
            kw.setdefault("kind", "function")
        sc = RewardScorer(RewardConfig(**kw))
        made.append(sc)
        return sc

    yield _make
    for sc in made:
        sc.close()


def test_per_sample_dict_result_sets_rewards_logs_numeric_extras_keeps_the_rest(make):
    sc = make(function=spec("echo_len"))
    ss = [sample("ab", weight=1.0), sample("abcd", weight=3.0), sample("x")]
    sc(ss)
    assert [s.reward for s in ss] == [2.0, 4.0, 1.0]
    m = sc.pop_metrics()
    # means over the samples that returned the field; prompt text reached the function
    assert m["rollout/reward/weight"] == pytest.approx((1.0 + 3.0 + 0.0) / 3)
    assert m["rollout/reward/prompt_chars"] == pytest.approx(
        sum(len(f"prompt of {t}") for t in ("ab", "abcd", "x")) / 3)
    assert m["rollout/reward/timeout_count"] == 0 and m["rollout/reward/fallback_count"] == 0
    assert "rollout/reward/label" not in m
    assert ss[0].meta[INFO_KEY]["label"] == "text extras are kept, not averaged"
    assert sc.pop_metrics() == {"rollout/reward/timeout_count": 0.0,
                                "rollout/reward/fallback_count": 0.0}  # popped = reset


def test_attach_task_gives_samples_the_problem_fields():
    class P:
        prompt_text, answer, meta = "2+2=", "4", {"answer": "4", "difficulty": "easy"}

    ss = [sample("a"), sample("b")]
    attach_task(ss, [P()], 2)
    assert all(s.meta["prompt"] == "2+2=" and s.meta["task"]["difficulty"] == "easy" for s in ss)


def test_time_limit_kills_the_call_and_counts_it(make):
    sc = make(function=spec("sleepy"), timeout_s=1.0, timeout_score=-1.0, max_failure_frac=1.0)
    sc([sample("0")])  # the worker is up (start-up never counts against a call)
    t0 = time.monotonic()
    ss = [sample("0"), sample("600"), sample("0")]
    sc(ss)
    assert time.monotonic() - t0 < 20  # 1 s limit + a fresh worker, not 600 s
    assert [s.reward for s in ss] == [1.0, -1.0, 1.0]
    assert sc.pool.kills == 1
    assert sc.pop_metrics()["rollout/reward/timeout_count"] == 1
    sc([sample("0")])  # the replacement worker serves the next call
    assert sc.pop_metrics()["rollout/reward/timeout_count"] == 0


def test_async_per_sample_runs_concurrently_with_per_sample_limits(make, monkeypatch):
    monkeypatch.setattr(scorer_mod, "ASYNC_KILL_GRACE_S", 1.0)
    sc = make(function=spec("async_sleepy"), concurrency=4, timeout_s=3.0, max_failure_frac=1.0)
    assert sc.is_async
    sc([sample("0")])
    t0 = time.monotonic()
    ss = [sample("1") for _ in range(4)]
    sc(ss)
    assert time.monotonic() - t0 < 3.5  # four 1 s sleeps on one event loop
    assert [s.reward for s in ss] == [1.0] * 4
    ss = [sample("0.1"), sample("600")]  # asyncio.wait_for ends the slow one; the worker lives
    sc(ss)
    assert [s.reward for s in ss] == [0.1, 0.0] and sc.pool.kills == 0
    blocked = make(function=spec("async_blocking"), timeout_s=1.0, max_failure_frac=1.0)
    ss = [sample("600")]
    blocked(ss)  # never awaits: wait_for cannot fire, the worker is killed
    assert ss[0].reward == 0.0 and blocked.pool.kills == 1
    assert blocked.pop_metrics()["rollout/reward/timeout_count"] == 1


@pytest.mark.parametrize("fn", ["batched_len", "async_batched"])
def test_batched_calls_in_batch_size_chunks(make, fn):
    sc = make(function=spec(fn), batched=True, batch_size=3)
    ss = [sample("x" * i) for i in range(7)]
    sc(ss)
    assert [s.reward for s in ss] == [float(i) for i in range(7)]


def test_batched_wrong_length_is_an_error_naming_the_count(make):
    sc = make(function=spec("batched_short"), batched=True, batch_size=3)
    with pytest.raises(RewardError, match="returned 2 values for 3 samples"):
        sc([sample("a"), sample("b"), sample("c")])


BAD = {  # function -> what the error says about the bad sample's result
    "nan_reward": "returned nan; a reward must be finite",
    "str_reward": "returned 'one' \\(str\\); a reward is a number",
    "raising": "KeyError: 'no such field'",
    "dies": "the reward worker died \\(exit code 3\\)",
    "lock": "could not be sent back",
}


@pytest.mark.parametrize("fn", sorted(BAD))
def test_bad_result_raises_naming_function_sample_and_value(make, fn):
    sc = make(function=spec(fn))
    with pytest.raises(RewardError) as e:
        sc([sample("ok"), sample("bad", answer="7", group=3)])
    msg = str(e.value)
    assert f"reward.function={spec(fn)!r}" in msg and "sample 1 (group 3, answer '7')" in msg
    assert re.search(BAD[fn], msg), msg
    assert "reward.on_error: fallback" in msg  # the fix


@pytest.mark.parametrize("fn", sorted(BAD))
def test_bad_result_with_fallback_is_scored_and_counted(make, fn):
    sc = make(function=spec(fn), on_error="fallback", fallback_score=-2.0)
    ss = [sample("ok"), sample("bad"), sample("ok")]
    sc(ss)
    assert [s.reward for s in ss] == [1.0, -2.0, 1.0]
    m = sc.pop_metrics()
    assert m["rollout/reward/fallback_count"] == 1 and m["rollout/reward/timeout_count"] == 0
    ss = [sample("ok")]
    sc(ss)  # a dead worker was replaced
    assert ss[0].reward == 1.0


def test_more_failures_than_max_failure_frac_raise(make):
    sc = make(function=spec("raising"), on_error="fallback", max_failure_frac=0.5)
    sc([sample("bad"), sample("ok")])  # 1 of 2: not more than half
    with pytest.raises(RewardError, match="2 failed .* more than reward.max_failure_frac=0.5"):
        sc([sample("bad"), sample("bad"), sample("ok")])


def test_math_verify_kind_in_workers_matches_the_direct_reward(make):
    sc = make(kind="math_verify", workers=2)
    cases = [("\\boxed{42}", "42"), ("\\boxed{41}", "42"), ("42", "42"),
             ("x \\boxed{\\frac{6}{3}}", "2"), ("\\boxed{1}\\boxed{9}", "9")]
    ss = [sample(t, a) for t, a in cases]
    sc(ss)
    assert [s.reward for s in ss] == [boxed_math_reward(t, a) for t, a in cases] == \
        [1.0, 0.0, 0.0, 1.0, 1.0]


# ------------------------------------------------------------------ config load (no workers)
def _load(tmp_path, reward: dict, name="c.yaml"):
    import yaml

    p = tmp_path / name
    p.write_text(yaml.safe_dump({"reward": reward}))
    return load_config(p)


def test_file_path_is_relative_to_the_config_and_resolved(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "my_reward.py").write_text(FNS.read_text())
    cfg = _load(tmp_path / "sub", {"kind": "function", "function": "my_reward.py:echo_len"})
    assert cfg.reward.function == f"{(tmp_path / 'sub' / 'my_reward.py').resolve()}:echo_len"


@pytest.mark.parametrize("reward,match", [
    ({"kind": "function", "function": "no_such_pkg.rewards:score"},
     r"reward.function='no_such_pkg.rewards:score': module 'no_such_pkg.rewards' does not "
     r"import \(ModuleNotFoundError"),
    ({"kind": "function", "function": "missing.py:score"}, r"file .*missing.py' not found"),
    ({"kind": "function", "function": f"{FNS}:nope"}, r"has no attribute 'nope'; use one of"),
    ({"kind": "function", "function": f"{FNS}:NOT_CALLABLE"}, r"is a int, not a function"),
    ({"kind": "function", "function": f"{FNS}:two_args"},
     r"two_args\(prompt, response\) cannot be called as fn\(prompt: str, response: str, meta: "
     r"dict\)"),
    ({"kind": "function", "function": f"{FNS}:two_args", "batched": True},
     r"cannot be called as fn\(prompts: list\[str\]"),
    ({"kind": "function"}, r"reward.function='': reward.kind is 'function' but no function"),
    ({"kind": "math_verify", "function": f"{FNS}:echo_len"}, r"only read with reward.kind: function"),
    ({"kind": "remote"}, r"reward.kind='remote': choose one of 'math_verify', 'function' or 'http'"),
    ({"timeout_s": 0}, r"reward.timeout_s=0 must be > 0"),
    ({"on_error": "ignore"}, r"reward.on_error='ignore'"),
    ({"kind": "http", "http": {"url": "localhost:8000"}}, r"reward.http.url='localhost:8000'"),
])
def test_bad_reward_config_names_the_field(tmp_path, reward, match):
    with pytest.raises(ConfigError, match=match):
        _load(tmp_path, reward)


def test_module_that_raises_on_import_is_named(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('needs a GPU')\ndef f(p, r, m): pass\n")
    with pytest.raises(ConfigError, match=r"importing .*broken.py' raised RuntimeError: needs a GPU"):
        _load(tmp_path, {"kind": "function", "function": "broken.py:f"})
