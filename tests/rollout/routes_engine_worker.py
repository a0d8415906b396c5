"""Samples with the engine's routed experts from a real SGLang server (script for the tests).

``python routes_engine_worker.py POLICY_DIR PRECISION OUT_DIR [ROUTER]`` starts one SGLang CPU
server with --enable-return-routed-experts on the policy, its weights in the rollout
``PRECISION`` (bf16 | fp8_emulated | nvfp4_emulated | mxfp4_emulated: a checkpoint quantized the
way the weight sync quantizes it, what a run with that ``rollout.precision`` serves), generates
groups of the arithmetic task through drpo's own rollout path (``seeded_generate_groups`` with
the policy's RouteSpec, through the client-side ``Fleet``) and writes ``OUT_DIR/samples.pkl`` (the Samples) and
``OUT_DIR/engine.json``: the raw ``meta_info.routed_experts`` of the first outputs decoded by
SGLang's own decoder (``extract_routed_experts_from_meta_info``) next to ours.  With ``ROUTER``
(``router``) it also sends one request through a real sglang-router 0.3.2 in front of the server
and records whether the field survives.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

PROMPTS = 4
SAMPLES_PER_PROMPT = 4
MAX_NEW_TOKENS = 12
TEMPERATURE = 1.0


def main(policy: str, precision: str, out_dir: str, router: str = "") -> None:
    from drpo_megatron.platform import apply_cpu_compat

    apply_cpu_compat()
    import numpy as np
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from drpo_megatron.data.arithmetic import make_problems
    from drpo_megatron.data.math import encode_prompt
    from drpo_megatron.rollout.engine import seeded_generate_groups
    from drpo_megatron.rollout.fleet import Fleet
    from drpo_megatron.rollout.router import SGLangRouter
    from drpo_megatron.rollout.routes import SERVER_FLAG, route_spec
    from drpo_megatron.rollout.server import ServerConfig, SGLangServer
    from drpo_megatron.weights.hf_export import write_hf_checkpoint

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    served = Path(policy)
    if precision != "bf16":  # the weights a run with this rollout.precision pushes
        named = {}
        for f in sorted(Path(policy).glob("*.safetensors")):
            named.update(load_file(str(f)))
        served = write_hf_checkpoint(sorted(named.items()), out / f"weights-{precision}",
                                     source_dir=policy, precision=precision)
    spec = route_spec("replay", policy)
    tok = AutoTokenizer.from_pretrained(policy)
    problems = make_problems(PROMPTS, seed=5, max_operand=9)
    prompts = [encode_prompt(tok, p.prompt_text) for p in problems]
    cfg = ServerConfig(startup_timeout_s=600, request_timeout_s=300, extra_args=[SERVER_FLAG])
    res: dict = {"precision": precision, "spec": [spec.num_layers, spec.top_k, spec.num_experts]}
    with SGLangServer(served, cfg, out / "logs", name="sglang-r3").start() as server:
        server.wait_healthy()
        # through the client-side fleet (rollout.router: client): the field must survive it
        samples = seeded_generate_groups(Fleet([server], max_attempts=1), prompts,
                                         [p.answer for p in problems],
                                         n=SAMPLES_PER_PROMPT, temperature=TEMPERATURE, top_p=1.0,
                                         max_new_tokens=MAX_NEW_TOKENS, seed=7, step=1,
                                         routes=spec)
        raw = server.generate(prompts[:2], {"n": 2, "temperature": TEMPERATURE,
                                            "max_new_tokens": MAX_NEW_TOKENS},
                              return_logprob=True, return_routed_experts=True)
        from sglang.srt.state_capturer.routed_experts import \
            extract_routed_experts_from_meta_info as sglang_decode

        from drpo_megatron.rollout.routes import decode_routed_experts

        res["decoder"] = []
        for i, o in enumerate(raw):
            p = prompts[i // 2]
            t = len(p) + len(o["output_ids"]) - 1
            theirs = np.asarray(sglang_decode(o)).reshape(t, spec.num_layers, spec.top_k)
            ours = decode_routed_experts(o["meta_info"], num_tokens=t, spec=spec,
                                         where="test").array()
            res["decoder"].append({"tokens": t, "equal": bool((theirs == ours).all()),
                                   "bytes_wire": len(o["meta_info"]["routed_experts"])})
        if router == "router":
            with SGLangRouter(out / "logs").start() as r:
                r.wait_up()
                r.add_worker(server.url)
                r.wait_workers([server.url])
                via = r.client(cfg).generate(prompts[:1], {"n": 1, "max_new_tokens": 4},
                                            return_logprob=True, return_routed_experts=True)
                res["router_keeps_routes"] = "routed_experts" in via[0]["meta_info"]
                res["router_meta_keys"] = sorted(via[0]["meta_info"])
    for i, smp in enumerate(samples):  # a gradient for the actor tests (rewards do not matter)
        smp.advantage = 1.0 if i % 2 else -1.0
    with open(out / "samples.pkl", "wb") as fh:
        pickle.dump(samples, fh)
    res["num_samples"] = len(samples)
    res["rows_ok"] = all(s.routed_experts.num_tokens == len(s.prompt_ids) + len(s.response_ids) - 1
                         for s in samples)
    # the prompt's routes are the same in every sample of a group (the prefix cache serves them
    # from the KV slot where the first sample's prefill wrote them)
    res["prompt_routes_shared"] = all(
        (samples[g * SAMPLES_PER_PROMPT + k].routed_experts.array()[:len(prompts[g]) - 1] ==
         samples[g * SAMPLES_PER_PROMPT].routed_experts.array()[:len(prompts[g]) - 1]).all()
        for g in range(PROMPTS) for k in range(SAMPLES_PER_PROMPT))
    (out / "engine.json").write_text(json.dumps(res))


if __name__ == "__main__":
    main(*sys.argv[1:])
