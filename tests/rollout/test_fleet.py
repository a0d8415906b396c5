"""Two real SGLang CPU servers behind the client-side fleet; one is killed mid-rollout.

The step must still return every sample of every group, at the current weight version; the dead
server is restarted and re-synced (tensor transport) before it takes requests again, and then
serves the same greedy probe as the server that never died.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from drpo_megatron.rollout.engine import rollout_metrics
from drpo_megatron.rollout.fleet import Fleet
from drpo_megatron.rollout.server import ServerConfig, SGLangServer
from drpo_megatron.rollout.verify import probe_server
from drpo_megatron.weights.transport import build_transport

pytestmark = [pytest.mark.slow, pytest.mark.extended,  # the router fleet's kill test covers it
              pytest.mark.skipif(torch.cuda.is_available(), reason="CPU SGLang server test")]

VERSION = 1


class PerturbedActor:
    """HF-named tensors of the tiny policy, perturbed (so a restarted server that was not
    re-synced would answer differently)."""

    def __init__(self, policy):
        from safetensors.torch import load_file

        self.base = load_file(str(policy / "model.safetensors"))

    def named_hf_tensors(self, precision="bf16"):
        g = torch.Generator().manual_seed(7)
        for name, t in self.base.items():
            t = t.float()
            yield name, (t * (1 + 0.3 * torch.randn(t.shape, generator=g)) if t.dim() == 2 else t)


def test_kill_one_server_mid_rollout(policy, tmp_path):
    from transformers import AutoTokenizer

    from drpo_megatron.models.tiny import prompt_ids

    # (the CPU server flags leave KV-pool headroom for the other server loading meanwhile)
    cfg = ServerConfig(startup_timeout_s=240, request_timeout_s=60)
    servers = [SGLangServer(policy, cfg, tmp_path / "logs", name=f"sglang-{i}") for i in range(2)]
    actor = PerturbedActor(policy)
    try:
        for s in servers:  # one at a time (see above)
            s.start()
            s.wait_healthy()
        build_transport("tensor", actor, servers, tmp_path, bucket_mb=1).push(VERSION)

        fleet = Fleet(servers, max_attempts=3,
                      resync=lambda s: build_transport("tensor", actor, [s], tmp_path).push(VERSION),
                      current_version=lambda: str(VERSION))
        victim = servers[1]
        old_pid = victim.proc.pid
        original = victim.generate

        def killed_on_first_call(*a, **k):  # dies with the request in flight
            victim.generate = original
            os.killpg(victim.proc.pid, signal.SIGKILL)
            victim.proc.wait()
            return original(*a, **k)

        victim.generate = killed_on_first_call
        tok = AutoTokenizer.from_pretrained(str(policy))
        prompts = [prompt_ids(tok, f"What is {a} + {a + 1}?") for a in range(8)]
        samples = fleet.generate_groups(prompts, [str(2 * a + 1) for a in range(8)], n=2,
                                        temperature=1.0, top_p=1.0, max_new_tokens=16)

        assert len(samples) == 16
        assert [s.group_id for s in samples] == [g for g in range(8) for _ in range(2)]
        assert all(s.prompt_ids == prompts[s.group_id] for s in samples)
        assert all(s.weight_version == str(VERSION) for s in samples)
        assert rollout_metrics(samples, str(VERSION))["rollout/staleness"] == 0.0
        assert any("restarting sglang-1" in e for e in fleet.events), fleet.events
        assert victim.proc.pid != old_pid and fleet.is_healthy(victim)
        assert victim.weight_version() == str(VERSION)
        # re-synced: the restarted server serves exactly what the survivor serves
        a, b = (probe_server(s, prompts[0]) for s in servers)
        assert a.response_ids == b.response_ids
        assert max(abs(x - y) for x, y in zip(a.rollout_logp, b.rollout_logp)) < 1e-3
    finally:
        for s in servers:
            s.stop()
