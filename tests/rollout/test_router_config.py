"""rollout.router / router_policy / router_url config checks and the external-router precedence
(no server, no router process)."""

from __future__ import annotations

import pytest

from drpo_megatron.config import ConfigError, RolloutConfig, load_config, validate
from drpo_megatron.rollout.router import RolloutSetup, resolve_router_url


def test_two_servers_behind_sglang_router_is_valid():
    cfg = load_config(None, {"rollout": {"num_servers": 2, "router": "sglang-router"}})
    validate(cfg)
    assert cfg.rollout.router_policy == "round_robin" and cfg.rollout.router_url is None


@pytest.mark.parametrize("rollout,match", [
    ({"router_policy": "fastest"}, "rollout.router_policy='fastest'"),
    ({"router": "nginx"}, "rollout.router='nginx'"),
    ({"router": "client", "router_url": "http://r:30000"}, "external router needs"),
])
def test_bad_router_settings(rollout, match):
    with pytest.raises(ConfigError, match=match):
        validate(load_config(None, {"rollout": rollout}))


def test_router_url_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("DRPO_ROUTER_URL", raising=False)
    assert resolve_router_url(RolloutConfig()) == (None, "")
    monkeypatch.setenv("DRPO_ROUTER_URL", "http://env:30000")
    assert resolve_router_url(RolloutConfig()) == ("http://env:30000", "DRPO_ROUTER_URL")
    # the config field wins over the environment
    assert resolve_router_url(RolloutConfig(router_url="http://cfg:1")) == \
        ("http://cfg:1", "rollout.router_url")
    # an external router: no server is created (they are discovered from the router later)
    setup = RolloutSetup(RolloutConfig(num_servers=2), tmp_path, tmp_path)
    assert setup.servers == [] and setup.router.external and setup.router.url == "http://env:30000"
    # non-driver ranks build nothing
    other = RolloutSetup(RolloutConfig(num_servers=2), tmp_path, tmp_path, driver=False)
    assert other.router is None and other.servers == [] and other.front() is None
