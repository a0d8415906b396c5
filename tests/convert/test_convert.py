"""``drpo convert`` (HF <-> Megatron-Core through megatron-bridge) on tiny Qwen3 / Qwen3-MoE / Qwen2
checkpoints built here (transformers config + random init + save_pretrained).

* HF -> mcore: the saved checkpoint, reloaded into a zeroed model, gives HF's logits within
  1e-5 (fp32) on the sample prompts;
* HF -> mcore -> HF is bit-exact (every tensor of the written safetensors equals the source);
* (slow) a checkpoint saved at TP1 loads at TP2 (torchrun, 2 ranks) with the same logits, and
  HF -> mcore directly at TP2 / EP2 / PP2;
* unsupported architectures and bad layouts fail before any process starts, naming what is
  supported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
LOGITS_ATOL = 1e-5  # fp32 (measured ~2e-7)


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def drpo(*args, timeout=400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "drpo_megatron.cli", *map(str, args)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=timeout)


def _ok(proc, what):
    assert proc.returncode == 0, f"{what} rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def make_tiny(out: Path, kind: str) -> Path:
    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                  tie_word_embeddings=False, rms_norm_eps=1e-6)
    if kind == "dense":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        model = Qwen3ForCausalLM(Qwen3Config(intermediate_size=128, **common))
    elif kind == "moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
            intermediate_size=128, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
            decoder_sparse_step=1, norm_topk_prob=True, **common))
    elif kind == "qwen2":  # the DeepSeek-R1-Distill-Qwen architecture (q/k/v biases)
        from transformers import Qwen2Config, Qwen2ForCausalLM

        common.pop("head_dim")
        model = Qwen2ForCausalLM(Qwen2Config(intermediate_size=128, **common))
    else:
        raise ValueError(kind)
    model.float().save_pretrained(out)
    return out


def _tensors(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module", params=["dense", "moe", pytest.param("qwen2", marks=pytest.mark.extended)])
def tiny(request, tmp_path_factory):
    return request.param, make_tiny(tmp_path_factory.mktemp(f"tiny_{request.param}") / "hf",
                                    request.param)


def test_hf_to_mcore_to_hf(tiny, tmp_path):
    kind, hf = tiny
    mcore, back = tmp_path / "mcore", tmp_path / "back"
    p = drpo("convert", "hf-to-mcore", "--hf", hf, "--out", mcore, "--report", tmp_path / "a.json")
    _ok(p, "hf-to-mcore")
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["verify"]["max_abs_diff"] <= LOGITS_ATOL, a
    assert a["verify"]["argmax_agreement"] == 1.0
    assert "verify: max |logit diff|" in p.stdout and "OK" in p.stdout
    assert (mcore / "metadata.json").is_file() and (mcore / "hf_config" / "config.json").is_file()
    assert json.loads((mcore / "drpo_convert.json").read_text())["architecture"] == \
        json.loads((hf / "config.json").read_text())["architectures"][0]

    p = drpo("convert", "mcore-to-hf", "--mcore", mcore, "--out", back, "--report", tmp_path / "b.json")
    _ok(p, "mcore-to-hf")
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["verify"]["max_abs_diff"] <= LOGITS_ATOL, b
    src, dst = _tensors(hf), _tensors(back)
    assert sorted(src) == sorted(dst)
    bad = [k for k in src if src[k].dtype != dst[k].dtype or not torch.equal(src[k], dst[k])]
    assert bad == [], f"round trip not bit-exact for {bad[:5]}"
    assert json.loads((back / "config.json").read_text())["architectures"] == \
        json.loads((hf / "config.json").read_text())["architectures"]


def test_unsupported_architecture_is_refused(tmp_path):
    from transformers import GPT2Config

    d = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32,
               architectures=["GPT2LMHeadModel"]).save_pretrained(d)
    p = drpo("convert", "hf-to-mcore", "--hf", d, "--out", tmp_path / "o", timeout=120)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()[-1]
    assert "GPT2LMHeadModel" in err and "Qwen3ForCausalLM" in err and "Qwen3MoeForCausalLM" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,needle", [
    (["--tp", "3"], "--tp=3: num_attention_heads=4"),
    (["--pp", "3"], "--pp=3: num_hidden_layers=2"),
    (["--ep", "3"], "--ep=3: num_experts=4"),
])
def test_bad_layout_is_refused(tmp_path_factory, args, needle):
    hf = make_tiny(tmp_path_factory.mktemp("lay") / "hf", "moe")
    p = drpo("convert", "hf-to-mcore", "--hf", hf, "--out", hf.parent / "o", *args, timeout=120)
    assert p.returncode == 2 and needle in p.stderr, p.stderr


@pytest.mark.slow
def test_tp1_checkpoint_loads_at_tp2(tmp_path):
    hf = make_tiny(tmp_path / "hf", "moe")
    mcore = tmp_path / "mcore_tp1"
    _ok(drpo("convert", "hf-to-mcore", "--hf", hf, "--out", mcore), "hf-to-mcore tp1")
    # mcore-to-hf at TP2: the command re-launches itself under torchrun with 2 ranks
    p = drpo("convert", "mcore-to-hf", "--mcore", mcore, "--out", tmp_path / "back_tp2", "--tp", "2",
             "--report", tmp_path / "r.json", timeout=600)
    _ok(p, "mcore-to-hf tp2")
    assert "launching" in p.stdout and "--nproc-per-node 2" in p.stdout
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["world_size"] == 2 and r["tp"] == 2
    assert r["verify"]["max_abs_diff"] <= LOGITS_ATOL
    src, dst = _tensors(hf), _tensors(tmp_path / "back_tp2")
    assert sorted(src) == sorted(dst) and all(torch.equal(src[k], dst[k]) for k in src)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [("--tp", "2"), pytest.param(("--ep", "2"), marks=pytest.mark.extended),
                                    pytest.param(("--pp", "2"), marks=pytest.mark.extended)])
def test_hf_to_mcore_multi_rank(tmp_path, layout):
    hf = make_tiny(tmp_path / "hf", "moe")
    p = drpo("convert", "hf-to-mcore", "--hf", hf, "--out", tmp_path / "m", *layout,
             "--report", tmp_path / "r.json", timeout=600)
    _ok(p, f"hf-to-mcore {layout}")
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["world_size"] == 2 and r["verify"]["max_abs_diff"] <= LOGITS_ATOL, r


def test_verification_failure_exits_1(tiny, tmp_path):
    # --atol -1: no logit difference can pass; the command must report FAILED and exit 1
    kind, hf = tiny
    if kind != "dense":
        pytest.skip("one architecture is enough for the failure path")
    p = drpo("convert", "hf-to-mcore", "--hf", hf, "--out", tmp_path / "m", "--atol", "-1")
    assert p.returncode == 1, p.stderr[-2000:]
    assert "FAILED" in p.stdout
