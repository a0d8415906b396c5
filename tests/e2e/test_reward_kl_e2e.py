"""`drpo train` with the loop options of docs/rewards.md and docs/losses.md, on CPU, few steps
(real SGLang server, real Megatron actor and reference policy):

* run ``function``: the example task model_configs/tiny_qwen3_moe_cpu_custom_reward.yaml (its
  custom reward model_configs/custom_reward.py is a file next to the config), sized down, with KL
  to the reference in the loss (k3) and the IcePop correction (old_policy anchor);
* run ``http``: a reward server on 127.0.0.1 started here, on jsonl problems with extra fields,
  KL in the reward, geo_mis rejection with the rollout anchor.

Checked against independent references: the rewards recomputed here from rollouts.jsonl with
the example function, the KL penalties recomputed with HF transformers' log-probs of the initial
policy, the advantages recomputed from the penalized rewards.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIG = ROOT / "model_configs" / "tiny_qwen3_moe_cpu_custom_reward.yaml"
EXAMPLE_REWARD = ROOT / "model_configs" / "custom_reward.py"
STEPS = 2
KL_COEF = 0.05


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("reward_kl")


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _base(root: Path) -> dict:
    return {
        "model": {"cache_dir": str(root / "cache"), "tiny": {"sft_steps": 60}},
        "rollout": {"prompts_per_step": 2, "samples_per_prompt": 4, "max_new_tokens": 12},
        "loss": {"horizon": 12},
        "optim": {"updates_per_rollout": 2},
        "train": {"max_steps": STEPS, "eval_every": STEPS, "eval_samples_per_prompt": 2},
        "logging": {"writers": ["jsonl"]},
        "reward": {"workers": 1},
    }


def _jsonl(path: Path, pairs) -> str:
    path.write_text("".join(json.dumps({"prompt": f"{a}+{b}", "answer": a + b, "max_chars": 10,
                                        "difficulty": "easy" if a + b < 6 else "hard"}) + "\n"
                            for a, b in pairs))
    return str(path)


# ---------------------------------------------------------------- function reward, KL in the loss
@pytest.fixture(scope="module")
def function_run(root, drpo_train):
    import yaml

    shutil.copy(EXAMPLE_REWARD, root / "custom_reward.py")  # next to the run's config file
    cfg = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    assert cfg["reward"]["function"] == "custom_reward.py:format_exact_match"
    base = _base(root)
    for section in ("model", "rollout", "train", "logging"):
        cfg[section].update(base[section])
    cfg["task"]["num_eval"] = 4
    cfg["optim"]["updates_per_rollout"] = 2
    cfg["loss"].update(horizon=12, params={"delta": 12.5, "anchor": "old_policy"},
                       kl={"coef": KL_COEF, "estimator": "k3"}, correction={"kind": "icepop"})
    return drpo_train(cfg, root, name="function", timeout=1200)


def test_example_config_custom_reward(function_run):
    spec = importlib.util.spec_from_file_location("example_reward", EXAMPLE_REWARD)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = _rows(function_run / "rollouts.jsonl")
    assert {r["step"] for r in rows} == set(range(1, STEPS + 1))
    for r in rows:  # the task's fields reached the reward, which scored what we score
        task = r["meta"]["task"]
        assert set(task) == {"answer", "question"} and r["meta"]["prompt"] == task["question"] + "="
        want = mod.format_exact_match(r["meta"]["prompt"], r["text"], task)
        assert r["reward"] == pytest.approx(want["score"])
        assert r["meta"]["reward_info"]["format_ok"] == want["format_ok"]
    metrics = [m for m in _rows(function_run / "metrics.jsonl") if m["step"] >= 1]
    for m in metrics:
        step_rows = [r for r in rows if r["step"] == m["step"]]
        for field in ("format_ok", "correct", "over_budget_chars"):
            want = sum(r["meta"]["reward_info"][field] for r in step_rows) / len(step_rows)
            assert m[f"rollout/reward/{field}"] == pytest.approx(want)
        assert m["rollout/reward/timeout_count"] == 0 and m["rollout/reward/fallback_count"] == 0
    assert "eval/reward/format_ok" in metrics[-1]


def test_kl_in_the_loss_and_icepop_are_logged(function_run):
    metrics = [m for m in _rows(function_run / "metrics.jsonl") if m["step"] >= 1]
    for m in metrics:
        assert math.isfinite(m["loss/kl_ref"]) and m["loss/kl_ref"] >= 0
        assert 0 <= m["loss/correction/rejected_frac"] <= 1
        assert m["loss/correction/num_tokens"] > 0
        assert math.isfinite(m["loss/policy_loss"]) and math.isfinite(m["loss/grad_norm"])
    # the policy moved away from the reference (the first mini-batch of step 1 is the reference)
    assert metrics[-1]["loss/kl_ref"] > 0
    log = (function_run / "logs" / "trainer.log").read_text()
    assert "reference policy ready" in log


# ---------------------------------------------------------------- HTTP reward, KL in the reward
class _Server:
    """Reward 1.0 when the response contains \\boxed{answer}; records the request bodies."""

    def __init__(self):
        self.bodies = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.bodies.append(body)
                rewards = [{"score": float(f"\\boxed{{{m['answer']}}}" in r), "chars": len(r)}
                           for r, m in zip(body["responses"], body["metas"])]
                data = json.dumps({"rewards": rewards}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/reward"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def http_run(root, drpo_train, function_run):  # after the function run: its cached policy
    server = _Server()
    cfg = _base(root)
    cfg["task"] = {"kind": "math", "prompt_template": "{problem}=",
                   "train_file": _jsonl(root / "train.jsonl", [(1, 2), (3, 4), (2, 2), (5, 1)]),
                   "eval_files": [_jsonl(root / "eval.jsonl", [(1, 1), (2, 3)])]}
    cfg["reward"].update(kind="http", http={"url": server.url, "batch_size": 3, "concurrency": 2,
                                            "timeout_s": 60.0})
    cfg["loss"].update(kl={"coef": KL_COEF, "estimator": "k3", "in_reward": True},
                       correction={"kind": "geo_mis", "low": 0.9, "high": 1.1})
    try:
        out = drpo_train(cfg, root, name="http", timeout=1200)
    finally:
        server.stop()
    return out, server


def test_http_reward_reaches_the_server_with_jsonl_fields(http_run):
    run, server = http_run
    assert server.bodies and all(len(b["responses"]) <= 3 for b in server.bodies)
    metas = [m for b in server.bodies for m in b["metas"]]
    # every field of the jsonl row but the prompt, extra fields included
    assert all(set(m) == {"answer", "max_chars", "difficulty"} for m in metas)
    assert all(m["max_chars"] == 10 and m["difficulty"] == ("easy" if int(m["answer"]) < 6
                                                            else "hard") for m in metas)
    assert all(p.endswith("=") for b in server.bodies for p in b["prompts"])
    rows = _rows(run / "rollouts.jsonl")
    for r in rows:
        want = float(f"\\boxed{{{r['answer']}}}" in r["text"])
        assert r["meta"]["task_reward"] == want
        assert r["meta"]["reward_info"] == {"chars": len(r["text"])}
    m = [m for m in _rows(run / "metrics.jsonl") if m["step"] >= 1]
    assert all(x["rollout/reward/timeout_count"] == 0 for x in m)
    assert all("loss/correction/rejected_frac" in x for x in m)
    assert "loss/kl_ref" in m[0] and "rollout/kl_penalty_mean" in m[0]


def test_kl_in_the_reward_matches_hf_reference_and_the_advantages_use_it(http_run):
    from transformers import AutoModelForCausalLM

    run, _ = http_run
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    policy = next(Path(cfg["model"]["cache_dir"]).glob("tiny-qwen3-moe-*"))
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    rows = _rows(run / "rollouts.jsonl")
    temp = cfg["rollout"]["temperature"]
    for r in rows:
        ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
        with torch.no_grad():
            lsm = torch.log_softmax(model(ids).logits[0].float() / temp, -1)
        p, n = len(r["prompt_ids"]), len(r["response_ids"])
        ref = lsm[p - 1:p - 1 + n].gather(1, torch.tensor(r["response_ids"])[:, None])[:, 0]
        mu = torch.tensor(r["rollout_logp"], dtype=torch.float64)
        x = ref.double() - mu
        want = KL_COEF * float((torch.exp(x) - 1 - x).sum())  # k3 of KL(mu || ref)
        assert r["meta"]["kl_penalty"] == pytest.approx(want, rel=1e-3, abs=1e-5)
        assert r["reward"] == pytest.approx(r["meta"]["task_reward"] - r["meta"]["kl_penalty"])
    # Dr. GRPO advantages of the penalized rewards: reward - group mean
    for step in {r["step"] for r in rows}:
        groups: dict = {}
        for r in rows:
            if r["step"] == step:
                groups.setdefault(r["group_id"], []).append(r)
        for g in groups.values():
            mean = sum(r["reward"] for r in g) / len(g)
            for r in g:
                assert r["advantage"] == pytest.approx(r["reward"] - mean, abs=1e-5)
