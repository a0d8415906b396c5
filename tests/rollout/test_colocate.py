"""Colocated rollout (drpo_megatron/rollout/colocate.py).

Fast: the switch (config field / DRPO_ROLLOUT_MODE), the refusals, the per-GPU server flags and
the memory split ``drpo plan`` prints.

Slow, with a real SGLang CPU server: ``/release_memory_occupation`` and
``/resume_memory_occupation`` work on CPU without the memory saver (SGLang's no-op adapter), and
one colocated step sends, as the server's own access log records them, release -> resume
weights -> pause -> begin/update_weights_from_tensor.../end -> flush -> version -> continue ->
resume KV cache, after which the server holds exactly the pushed weights (probe log-probs equal
an HF fp32 forward of them; the previous version's do not).  What a GPU adds -- the memory
really returned and mapped again -- is in tools/gpu_check.py.
"""

from __future__ import annotations

import re

import pytest
import torch

from drpo_megatron.config import ConfigError, load_config
from drpo_megatron.rollout import colocate

R1 = "model_configs/deepseek_r1_distill_qwen_1_5b_bf16.yaml"


def test_switch_from_config_or_env(monkeypatch):
    monkeypatch.delenv(colocate.MODE_ENV, raising=False)
    cfg = load_config(None)
    assert colocate.requested(cfg) == (False, "")
    cfg.rollout.colocate = True
    assert colocate.requested(cfg) == (True, "rollout.colocate")
    cfg.rollout.colocate = False
    monkeypatch.setenv(colocate.MODE_ENV, "colocated")
    assert colocate.requested(cfg) == (True, "DRPO_ROLLOUT_MODE=colocated")
    monkeypatch.setenv(colocate.MODE_ENV, "sideways")
    with pytest.raises(colocate.ColocationError, match="DRPO_ROLLOUT_MODE='sideways'"):
        colocate.requested(cfg)


@pytest.mark.parametrize("overrides,needle", [
    ({"parallel": {"rollout_nodes": 1}}, "parallel.rollout_nodes=1"),
    ({"rollout": {"num_servers": 2}}, "rollout.num_servers=2"),
    ({"rollout": {"weight_transport": "distributed"}}, "weight_transport='distributed'"),
])
def test_colocated_config_refusals(overrides, needle, monkeypatch):
    monkeypatch.delenv(colocate.MODE_ENV, raising=False)
    ov = {"rollout": {"colocate": True}}
    for k, v in overrides.items():
        ov.setdefault(k, {}).update(v)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(None, ov)


def test_server_flags_per_gpu():
    assert colocate.server_args(0, rollout_tp=2, mem_fraction=0.5, cuda=False) == []
    assert colocate.server_args(3, rollout_tp=2, mem_fraction=0.6789, cuda=True) == [
        "--enable-memory-saver", "--tp-size", "2", "--base-gpu-id", "6",
        "--mem-fraction-static", "0.679"]

    class S:
        def __init__(self, extra):
            from drpo_megatron.rollout.server import ServerConfig

            self.cfg = ServerConfig(extra_args=extra)

    servers = [S([]), S(["--mem-fraction-static", "0.5"])]
    colocate.configure_servers(servers, rollout_tp=1, mem_fraction=0.7, cuda=True)
    assert servers[0].cfg.extra_args == ["--enable-memory-saver", "--tp-size", "1",
                                         "--base-gpu-id", "0", "--mem-fraction-static", "0.700"]
    # the user's own flag wins
    assert servers[1].cfg.extra_args == ["--mem-fraction-static", "0.5", "--enable-memory-saver",
                                         "--tp-size", "1", "--base-gpu-id", "1"]


def test_plan_memory_split_r1_distill():
    from drpo_megatron.operate.plan import make_plan, resolve_arch

    cfg = load_config(R1)
    p = make_plan(cfg)
    mem = colocate.colocated_memory(p, resolve_arch(cfg), cfg)
    resident = p.weights_gib + p.grads_gib + p.optimizer_gib + p.overhead_gib
    assert mem.trainer_resident_gib == pytest.approx(resident)
    assert mem.server_weights_gib == pytest.approx(p.params_total * 2 / 2**30)
    # the parts fill the budget exactly, and F is SGLang's (weights + KV) / GPU memory
    total = resident + mem.server_weights_gib + mem.kv_cache_gib + colocate.SERVER_RESERVE_GIB
    assert total == pytest.approx(p.budget_gib)
    assert mem.mem_fraction_static == pytest.approx(
        (mem.server_weights_gib + mem.kv_cache_gib) / p.budget_gib)
    # R1-Distill-Qwen-1.5B: 28 layers x 2 KV heads x 128 x 2 (K, V) x 2 B per token
    assert colocate.kv_bytes_per_token(resolve_arch(cfg), 1) == 28 * 2 * 128 * 2 * 2
    assert mem.kv_tokens >= mem.max_seq_tokens
    # a budget that leaves no KV cache is refused, naming the field
    cfg.parallel.gpu_memory_gb = 28  # 15.4 resident + 3.3 weights + 10 reserve: no KV left
    with pytest.raises(colocate.ColocationError, match=r"gpu_memory_gb=28: colocated"):
        colocate.colocated_memory(make_plan(cfg), resolve_arch(cfg), cfg)


def test_plan_prints_the_colocated_line(capsys):
    from drpo_megatron.operate.plan import main

    assert main([R1]) == 0
    out = capsys.readouterr().out
    assert "colocated rollout per GPU:" in out and "--mem-fraction-static" in out


# ------------------------------------------------------------------------- real server (slow)

@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU SGLang server test")
def test_colocated_step_with_real_server(policy, tmp_path):
    import test_transport_e2e as te  # the fake actor and the HF reference of the transport test

    from drpo_megatron.weights.sync import PausedTransport
    from drpo_megatron.rollout.server import ServerConfig, SGLangServer
    from drpo_megatron.rollout.verify import WeightSyncMismatch, verify_sync
    from drpo_megatron.weights.transport import build_transport

    logs = tmp_path / "logs"
    s = SGLangServer(policy, ServerConfig(startup_timeout_s=400, dtype="float32"), logs,
                     name="sglang-colo")
    colocate.configure_servers([s], rollout_tp=1, mem_fraction=None, cuda=False)
    s.start()
    try:
        s.wait_healthy()
        s.set_weight_version("0")
        from transformers import AutoTokenizer

        from drpo_megatron.models.tiny import prompt_ids

        probe = prompt_ids(AutoTokenizer.from_pretrained(str(policy)), "What is 7 + 5?")
        s.generate([probe], {"max_new_tokens": 4, "temperature": 1.0})
        actor = te.FakeActor(policy)
        colo = colocate.Colocation([s])
        transport = colocate.ColocatedTransport(
            PausedTransport(build_transport("tensor", actor, [s], tmp_path / "w",
                                            bucket_mb=te.BUCKET_MB), [s]), colo)
        mark = len(s.log_path.read_text().splitlines())

        # one colocated step: release before training, then the push
        rel = colo.release()
        assert colo.released and rel["perf/colocate_release_s"] >= 0
        actor.version = 1
        perf = transport.push(1)
        assert not colo.released
        assert s.weight_version() == "1"
        assert perf["perf/colocate_resume_weights_s"] >= 0 and perf["perf/colocate_resume_kv_s"] >= 0
        assert colo.events == [("sglang-colo", "release", None),
                               ("sglang-colo", "resume", ("weights",)),
                               ("sglang-colo", "resume", ("kv_cache", "cuda_graph"))]
        # the order the server saw (its access log)
        posts = re.findall(r'"POST (/[a-z_]+) HTTP', "\n".join(s.log_path.read_text().splitlines()[mark:]))
        seq = [p for i, p in enumerate(posts) if i == 0 or p != posts[i - 1]]  # runs collapsed
        assert seq == ["/release_memory_occupation", "/resume_memory_occupation",
                       "/pause_generation", "/begin_weight_update", "/update_weights_from_tensor",
                       "/end_weight_update", "/flush_cache", "/update_weight_version",
                       "/continue_generation", "/resume_memory_occupation"], posts

        # the resumed server holds exactly version 1 and generates
        ref = te.hf_reference(actor, "bf16", tmp_path, 1)
        verify_sync([s], 1, probe, ref, atol=te.ATOL)
        with pytest.raises(WeightSyncMismatch):
            verify_sync([s], 1, probe, te.hf_reference(actor, "bf16", tmp_path, 0), atol=te.ATOL)
        out = s.generate([probe], {"max_new_tokens": 4, "temperature": 1.0})
        assert out[0]["meta_info"]["weight_version"] == "1"

        # a push without a release (resume from a checkpoint) sends no resume
        mark = len(s.log_path.read_text().splitlines())
        actor.version = 2
        transport.push(2)
        tail = "\n".join(s.log_path.read_text().splitlines()[mark:])
        assert "memory_occupation" not in tail and s.weight_version() == "2"
    finally:
        s.stop()
    # a clean stop is not a crash in the server's log
    text = s.log_path.read_text()
    assert "crashed" not in text and "SIGQUIT" not in text and s.proc.returncode == 0


@pytest.mark.slow
@pytest.mark.extended  # release/resume around a push: the real-server test above; recompute: test_recompute.py
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU run")
def test_drpo_train_colocated_with_full_recompute(tmp_path, drpo_train, monkeypatch):
    """The loop's wiring: ``drpo train`` with ``rollout.colocate`` releases the server before every
    training phase and resumes it around every push (server access log, step metrics), samples
    of step k come from weight version k-1, and ``parallel.recompute: full`` reaches Megatron."""
    import json

    monkeypatch.delenv(colocate.MODE_ENV, raising=False)
    steps = 2
    cfg = {"rollout": {"prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 12,
                       "colocate": True, "weight_transport": "tensor"},
           "loss": {"horizon": 12}, "optim": {"updates_per_rollout": 2},
           "train": {"max_steps": steps, "eval_every": 0},
           "parallel": {"recompute": "full"}}
    run = drpo_train(cfg, tmp_path, timeout=1200)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert {"perf/colocate_release_s", "perf/colocate_resume_weights_s",
                "perf/colocate_resume_kv_s"} <= set(m)
    rows = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    assert {r["weight_version"] for r in rows if r["step"] == 2} == {"1"}
    log = (run / "logs" / "sglang-0.log").read_text()
    posts = re.findall(r'"POST (/(?:release|resume)_memory_occupation|/update_weight_version) HTTP', log)
    # start-up sets version 0; then per step: release, resume (weights), version, resume (KV)
    per_step = ["/release_memory_occupation", "/resume_memory_occupation",
                "/update_weight_version", "/resume_memory_occupation"]
    assert posts == ["/update_weight_version"] + per_step * steps, posts
    trainer_log = (run / "logs" / "trainer.log").read_text()
    assert "recompute=full" in trainer_log and "colocated rollout (rollout.colocate)" in trainer_log
    assert "Traceback" not in trainer_log
    assert "crashed" not in log and "SIGQUIT" not in log


def test_plan_refuses_a_colocated_distributed_transport(tmp_path, capsys):
    """The GPU config's colocated layout is checked by drpo plan / submit, not first in the job."""
    from drpo_megatron.operate.plan import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(open(R1).read().replace("weight_transport: tensor", "weight_transport: distributed"))
    assert main([str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weight_transport='distributed'" in err[0] and "'tensor'" in err[0]
