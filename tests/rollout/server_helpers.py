"""Helpers of the tests that drive real SGLang CPU servers directly (router, partial rollouts):
versioned weights, SGLang's slow-down hook, pushes."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import torch


class VersionedActor:
    """HF-named tensors of the tiny policy, perturbed per version (a server left at an older
    version, or not re-synced, answers differently)."""

    def __init__(self, policy):
        from safetensors.torch import load_file

        self.base = load_file(str(policy / "model.safetensors"))
        self.version = 0

    def named_hf_tensors(self, precision="bf16"):
        g = torch.Generator().manual_seed(100 + self.version)
        for name, t in self.base.items():
            t = t.float()
            yield name, (t * (1 + 0.3 * torch.randn(t.shape, generator=g)) if t.dim() == 2 else t)


def slow_down(servers, seconds):
    """SGLang's test hook: sleep this long before every forward step (None: off), so that a
    generation is surely still running when the test acts on it."""
    import requests

    for s in servers:
        r = requests.post(s.url + "/slow_down", json={"forward_sleep_time": seconds}, timeout=30)
        assert r.status_code == 200, r.text


def wait_in_flight(front, th):
    while front.in_flight == 0:
        assert th.is_alive(), "the generation ended before it went in flight"
        time.sleep(0.05)
    time.sleep(1.0)  # the requests reach the servers (each forward step sleeps 0.05 s)


def push(transport, actor, version):
    actor.version = version
    return transport.push(version)


def generate_across_a_push(generate, setup, front, transport, actor, version):
    """Run ``generate()`` in a thread on slowed-down servers, push ``version`` once its requests
    are in flight, and return its result (an error it raised is re-raised here)."""
    out: dict = {}

    def run():
        try:
            out["result"] = generate()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            out["error"] = e

    slow_down(setup.servers, 0.05)
    th = threading.Thread(target=run)
    try:
        th.start()
        wait_in_flight(front, th)  # then push under the running generation
        push(transport, actor, version)
    finally:
        slow_down(setup.servers, None)
        th.join(600)
    if "error" in out:
        raise out["error"]
    return out["result"]


@contextmanager
def versioned_rollout(cfg, policy, tmp):
    """The servers of ``cfg`` (a RolloutConfig) through RolloutSetup, what build_run uses, with a
    tensor transport of a :class:`VersionedActor` in the pause bracket; yields
    ``(setup, front, transport, actor)`` and stops the servers after."""
    from drpo_megatron.rollout.router import RolloutSetup
    from drpo_megatron.weights.sync import PausedTransport, one_server_resync
    from drpo_megatron.weights.transport import build_transport

    actor = VersionedActor(policy)
    setup = RolloutSetup(cfg, policy, tmp / "logs")
    try:
        setup.start()
        setup.wait_ready()

        def make(servers):
            return build_transport("tensor", actor, servers, tmp / "weights", bucket_mb=1)

        transport = PausedTransport(make(setup.servers), setup.servers)
        front = setup.front(one_server_resync(make), current_version=lambda: transport.version,
                            max_attempts=3)
        yield setup, front, transport, actor
    finally:
        setup.stop()
