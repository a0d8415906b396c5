"""The asynchronous batch source without servers (rollout/async_rollout.py): the staleness check
and its policies against hand-computed cases, the producer's version gate and its checkpoint
state driven by a real prompt stream, the samples' checkpoint form, and the config checks.  The
real-server behaviour (K = 0 equals sync, the bound over whole runs, partial rollouts, kill and
resume) is in tests/e2e/test_async_e2e.py and tests/rollout/test_partial_rollouts.py."""

from __future__ import annotations

import threading

import pytest
import torch

from drpo_megatron.config import load_config
from drpo_megatron.rollout.async_rollout import (AsyncRollouts, BatchSource, enforce_staleness,
                                                 groups_of, staleness_metrics)
from drpo_megatron.samples import RoutedExperts, Sample
from drpo_megatron.schema import ConfigError


def sample(group: int, version: int, n_tokens: int = 2, token_versions=None, **kw) -> Sample:
    return Sample(group_id=group, prompt_ids=[1, 2], response_ids=list(range(n_tokens)),
                  rollout_logp=[-0.5] * n_tokens, text="t", finish_reason="stop",
                  weight_version=str(version), token_versions=token_versions, **kw)


def batch(versions_per_group: list[int], n: int = 2) -> list[Sample]:
    return [sample(g, v) for g, v in enumerate(versions_per_group) for _ in range(n)]


# ------------------------------------------------------------------ the staleness check
def test_drop_removes_whole_groups_over_the_bound_and_renumbers():
    # step 5 trains on version 4: lags are 4 - v = [0, 2, 1, 3]; K = 1 keeps groups 0 and 2
    samples = batch([4, 2, 3, 1])
    kept, m = enforce_staleness(samples, step=5, max_staleness=1, policy="drop")
    assert [s.weight_version for s in kept] == ["4", "4", "3", "3"]
    assert [s.group_id for s in kept] == [0, 0, 1, 1]
    assert m == {"rollout/stale_dropped_groups": 2.0, "rollout/stale_regenerated_groups": 0.0}


def test_a_group_is_stale_when_any_token_is():
    # partial rollout: the response began on version 1 and finished on 4
    g0 = [sample(0, 4, 3, token_versions=[1, 4, 4]), sample(0, 4, 3)]
    kept, m = enforce_staleness(g0 + [sample(1, 4), sample(1, 4)], step=5, max_staleness=2,
                                policy="drop")
    assert [s.group_id for s in kept] == [0, 0] and m["rollout/stale_dropped_groups"] == 1.0


def test_regenerate_replaces_the_stale_groups_in_place():
    samples = batch([1, 4, 0])
    calls = []

    def regenerate(step, groups):
        calls.append((step, [g[0].weight_version for g in groups]))
        return [[sample(99, step - 1, answer=f"new{i}") for _ in g] for i, g in enumerate(groups)]

    out, m = enforce_staleness(samples, step=5, max_staleness=0, policy="regenerate",
                               regenerate=regenerate)
    assert calls == [(5, ["1", "0"])]
    assert [s.answer for s in out] == ["new0", "new0", "", "", "new1", "new1"]
    assert [s.group_id for s in out] == [0, 0, 1, 1, 2, 2]
    assert m["rollout/stale_regenerated_groups"] == 2.0


def test_nothing_stale_passes_unchanged():
    samples = batch([3, 4])
    out, m = enforce_staleness(samples, step=5, max_staleness=1, policy="drop")
    assert out == samples and m["rollout/stale_dropped_groups"] == 0.0


def test_staleness_metrics_hand_computed():
    # step 3 trains on version 2.  Sample lags (oldest token): 0, 2, 1 -> mean 1, max 2.
    # tokens: [2, 2] + [0, 1, 2] + [1] -> lags [0, 0, 2, 1, 0, 1]: lag0 3/6, lag1 2/6, lag2 1/6
    samples = [sample(0, 2, 2), sample(0, 2, 3, token_versions=[0, 1, 2]), sample(1, 1, 1)]
    m = staleness_metrics(samples, step=3)
    assert m["rollout/staleness_mean"] == pytest.approx(1.0)
    assert m["rollout/staleness_max"] == 2.0
    assert m["rollout/staleness_lag0_token_frac"] == pytest.approx(3 / 6)
    assert m["rollout/staleness_lag1_token_frac"] == pytest.approx(2 / 6)
    assert m["rollout/staleness_lag2_token_frac"] == pytest.approx(1 / 6)


def test_groups_of_splits_group_major_samples():
    assert [len(g) for g in groups_of(batch([1, 1, 1], n=3))] == [3, 3, 3]


# ------------------------------------------------------------------ checkpoint form
def test_samples_survive_a_weights_only_checkpoint(tmp_path):
    routes = RoutedExperts.from_array([[[1, 2]], [[3, 0]]])
    s = sample(3, 7, 2, token_versions=[6, 7], routed_experts=routes, meta={"prompt_index": 5})
    path = tmp_path / "state.pt"
    torch.save({"batch": [s.to_state()]}, path)
    back = Sample.from_state(torch.load(path, weights_only=True)["batch"][0])
    assert back == s


# ------------------------------------------------------------------ the producer
class Prompts:
    """A prompt stream stand-in with the real cursor semantics (numbers instead of problems)."""

    def __init__(self):
        self.cursor = 0

    def next(self, k):
        out = list(range(self.cursor, self.cursor + k))
        self.cursor += k
        return out

    def state_dict(self):
        return {"cursor": self.cursor}

    def load_state_dict(self, state):
        self.cursor = int(state["cursor"])


def make_source(mode, prompts, *, k_prompts=2, max_staleness=1, gate=None, log=None):
    """A source whose produce draws ``k_prompts`` prompts and makes one sample per prompt at
    the version the producer saw published (the samples of a real batch carry exactly that)."""
    holder = {}

    def produce(step):
        version = holder["source"]._version if mode == "async" else step - 1
        if log is not None:
            log.append(("start", step, version))
        if gate is not None:
            gate(step)
        ids = prompts.next(k_prompts)
        return ([sample(g, version, meta={"prompt_index": i}) for g, i in enumerate(ids)],
                {"perf/rollout_time_s": 0.0})

    cls = AsyncRollouts if mode == "async" else BatchSource
    src = cls(produce, cursor_state=prompts.state_dict, max_staleness=max_staleness)
    holder["source"] = src
    return src


@pytest.mark.parametrize("k", [0, 1, 2])
def test_the_producer_never_starts_a_batch_before_its_version_gate(k):
    events: list[tuple] = []
    lock = threading.Lock()
    prompts = Prompts()
    src = make_source("async", prompts, max_staleness=k, log=events)
    src.start(1, 8, version=0)
    try:
        for step in range(1, 9):
            samples, m = src.get(step)
            assert m["rollout/staleness_max"] <= k
            assert all(step - 1 - int(s.weight_version) <= k for s in samples)
            with lock:
                events.append(("published", step))
            src.published(step)
    finally:
        src.close()
    starts = {e[1]: i for i, e in enumerate(events) if e[0] == "start"}
    pubs = {e[1]: i for i, e in enumerate(events) if e[0] == "published"}
    for t, at in starts.items():
        need = t - 1 - k  # the version that must be out before batch t starts
        if need >= 1:
            assert pubs[need] < at, f"batch {t} started before version {need} was pushed"
    if k >= 1:  # it did run ahead: batch 2 started before version 1 existed
        assert starts[2] < pubs[1]


def test_k0_async_serves_the_sync_schedule():
    got = {}
    for mode in ("sync", "async"):
        prompts = Prompts()
        src = make_source(mode, prompts, max_staleness=0)
        src.start(1, 5, version=0)
        seen = []
        for step in range(1, 6):
            samples, _ = src.get(step)
            seen.append([(s.weight_version, s.meta["prompt_index"]) for s in samples])
            src.published(step)
        src.close()
        got[mode] = seen
    assert got["sync"] == got["async"]


def test_state_dict_holds_the_finished_batches_and_the_cursor_before_the_one_in_progress():
    prompts = Prompts()
    in_step3, release = threading.Event(), threading.Event()

    def gate(step):
        if step == 3:
            in_step3.set()
            release.wait(30)

    src = make_source("async", prompts, max_staleness=2, gate=gate)
    src.start(1, 6, version=0)
    trained = []
    try:
        samples, _ = src.get(1)  # batch 1 trained; 2 finished; 3 in progress
        trained += [s.meta["prompt_index"] for s in samples]
        assert in_step3.wait(30)
        while 2 not in src._ready:
            in_step3.wait(0.05)
        state = src.state_dict()
    finally:
        release.set()
        src.close()
    assert state["cursor"] == 4  # batches 1 and 2 drew prompts 0-3; batch 3 is redone
    assert [b["step"] for b in state["pending_batches"]] == [2]

    # "kill" here: a new source resumes from the state after step 1
    prompts2 = Prompts()
    src2 = make_source("async", prompts2, max_staleness=2)
    src2.load_state_dict(state, prompts2.load_state_dict)
    src2.start(2, 6, version=1)
    try:
        for step in range(2, 7):
            samples, _ = src2.get(step)
            trained += [s.meta["prompt_index"] for s in samples]
            src2.published(step)
    finally:
        src2.close()
    assert trained == list(range(12))  # every prompt trained once, none lost, in order


def test_restored_batches_over_a_smaller_bound_are_dropped():
    prompts = Prompts()
    src = make_source("sync", prompts, max_staleness=0)
    old = {"cursor": 4, "pending_batches": [
        {"step": 2, "samples": [sample(0, 0).to_state(), sample(1, 1).to_state()], "metrics": {}}]}
    src.load_state_dict(old, prompts.load_state_dict)
    samples, m = src.get(2)  # step 2 trains on version 1: the version-0 group is too old
    assert [s.weight_version for s in samples] == ["1"]
    assert m["rollout/stale_dropped_groups"] == 1.0
    samples, _ = src.get(3)  # then generation resumes at the cursor
    assert [s.meta["prompt_index"] for s in samples] == [4, 5]


def test_a_producer_error_reaches_the_trainer():
    def produce(step):
        raise RuntimeError("server gone")

    src = AsyncRollouts(produce, cursor_state=dict, max_staleness=1)
    src.start(1, 3, version=0)
    with pytest.raises(RuntimeError, match="server gone"):
        src.get(1)
    src.close()


# ------------------------------------------------------------------ config
def test_partial_rollouts_need_async_mode():
    with pytest.raises(ConfigError, match="rollout.partial_rollouts.*rollout.mode: async"):
        load_config(overrides={"rollout": {"partial_rollouts": True}})


def test_unknown_mode_and_negative_staleness_are_refused():
    with pytest.raises(ConfigError, match="rollout.mode"):
        load_config(overrides={"rollout": {"mode": "asynchronous"}})
    with pytest.raises(ConfigError, match="rollout.max_staleness"):
        load_config(overrides={"rollout": {"mode": "async", "max_staleness": -1}})


def test_async_mode_with_colocated_servers_is_refused():
    with pytest.raises(ConfigError, match="rollout.mode=async with rollout.colocate"):
        load_config(overrides={"rollout": {"mode": "async", "colocate": True},
                               "parallel": {"rollout_nodes": 0}})
