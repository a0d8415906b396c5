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
import subprocess
import sys
from pathlib import Path

import pytest
from subprocess_util import worker_env
import torch

ROOT = Path(__file__).resolve().parents[2]
LOGITS_ATOL = 1e-5  # fp32 (measured ~2e-7)


def _env() -> dict:
    return worker_env()


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
    assert "Traceback" not in p.stderr  # e.g. megatron-bridge's optional-import notices
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
                                    pytest.param(("--pp", "2"), marks=pytest.mark.extended),
                                    # TP x EP on CPU: with ETP 1 (ETP > 1 is refused on gloo)
                                    pytest.param(("--tp", "2", "--ep", "2", "--etp", "1"),
                                                 marks=pytest.mark.extended)])
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


# ----------------------------------------------------------------- output safety (no model load)

def _converted(tmp_path, kind="dense") -> Path:
    return make_tiny(tmp_path / f"hf_{kind}", kind)


def _refused(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def _snapshot(d: Path) -> dict:
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}


def test_existing_out_is_never_replaced_without_force(tmp_path):
    hf = _converted(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    _refused(drpo("convert", "hf-to-mcore", "--hf", hf, "--out", out, timeout=120),
             "--out", "exists and is not empty", "--force")
    assert (out / "precious.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1
    assert not (tmp_path / "out.converting").exists()
    fake = tmp_path / "mcore"  # refused before the checkpoint is read
    fake.mkdir()
    (fake / "metadata.json").write_text("{}")
    _refused(drpo("convert", "mcore-to-hf", "--mcore", fake, "--hf-config", hf, "--out", out,
                  timeout=120), "--out", "exists and is not empty")
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_out_overlapping_the_source_is_refused(tmp_path, where):
    hf = _converted(tmp_path)
    before = _snapshot(hf)
    out = {"same": hf, "inside": hf / "mcore", "parent": hf.parent}[where]
    msg = _refused(drpo("convert", "hf-to-mcore", "--hf", hf, "--out", out, "--force", timeout=120),
                   "--out", "--hf")
    assert ("contains" if where == "parent" else "source") in msg
    assert _snapshot(hf) == before


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    hf = _converted(tmp_path)
    f = hf / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _refused(drpo("convert", "hf-to-mcore", "--hf", hf, "--out", tmp_path / "o", timeout=120),
             "--hf", "model.safetensors is damaged", "truncated", "copy it again")
    assert not (tmp_path / "o").exists()


def test_ep_with_etp_on_cpu_is_refused_before_any_process(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("gloo-only refusal")
    hf = _converted(tmp_path, "moe")
    p = drpo("convert", "hf-to-mcore", "--hf", hf, "--out", tmp_path / "o", "--tp", "2", "--ep", "2",
             timeout=120)
    _refused(p, "--ep=2", "--etp (default --tp=2)", "--etp 1")
    assert "launching" not in p.stdout and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------ conversions (slow)

@pytest.mark.slow
def test_force_replaces_only_after_verification(tmp_path):
    hf = _converted(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    # a conversion that fails verification leaves --out as it was, the result in OUT.converting
    p = drpo("convert", "hf-to-mcore", "--hf", hf, "--out", out, "--force", "--atol", "-1")
    assert p.returncode == 1 and "FAILED" in p.stdout and "not put in place" in p.stderr, p.stderr
    assert [f.name for f in out.iterdir()] == ["old.txt"]
    assert (tmp_path / "out.converting" / "new" / "metadata.json").is_file()
    # a verified one replaces it, and the staging area is gone
    _ok(drpo("convert", "hf-to-mcore", "--hf", hf, "--out", out, "--force"), "--force")
    assert (out / "metadata.json").is_file() and not (out / "old.txt").exists()
    assert json.loads((out / "drpo_convert.json").read_text())["published"] is True
    assert not (tmp_path / "out.converting").exists()


def _swap_experts(src: Path, dst: Path, layer: int = 0, a: int = 0, b: int = 1) -> None:
    """A copy of ``src`` whose experts ``a`` and ``b`` of ``layer`` are exchanged (what a wrong
    expert mapping in a conversion produces)."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    t = _tensors(src)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        ka = f"model.layers.{layer}.mlp.experts.{a}.{proj}.weight"
        kb = f"model.layers.{layer}.mlp.experts.{b}.{proj}.weight"
        t[ka], t[kb] = t[kb], t[ka]
    for f in dst.glob("*.safetensors"):
        f.unlink()
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.slow
def test_bf16_verification_fails_a_swapped_expert_conversion(tmp_path):
    """bf16: a conversion whose experts 0 and 1 of layer 0 are swapped must fail verification
    (the old fixed bound of 0.5 on max |logit diff| passed it), a correct one must pass."""
    hf = make_tiny(tmp_path / "hf", "moe")
    if "model.layers.0.mlp.experts.0.gate_proj.weight" not in _tensors(hf):
        pytest.skip("expert weights are stored fused in this transformers version")
    swapped = tmp_path / "hf_swapped"
    _swap_experts(hf, swapped)
    mcore = tmp_path / "mcore_swapped"
    p = drpo("convert", "hf-to-mcore", "--hf", swapped, "--out", mcore, "--dtype", "bf16",
             "--report", tmp_path / "ok.json")
    _ok(p, "hf-to-mcore bf16 (of the swapped checkpoint: a correct conversion of it)")
    good = json.loads((tmp_path / "ok.json").read_text())["verify"]
    assert good["ok"] and good["noise_ratio"] <= 3.0
    # the same checkpoint verified against the original: what a conversion that swapped two
    # experts looks like
    p = drpo("convert", "verify", "--mcore", mcore, "--hf", hf, "--dtype", "bf16",
             "--report", tmp_path / "bad.json")
    bad = json.loads((tmp_path / "bad.json").read_text())["verify"]
    assert p.returncode == 1 and "FAILED" in p.stdout, (p.stdout[-2000:], bad)
    print(f"bf16 verification: correct {good['noise_ratio']:.2f}x noise (max {good['max_abs_diff']:.3g}), "
          f"swapped experts {bad['noise_ratio']:.2f}x noise (max {bad['max_abs_diff']:.3g}), "
          f"noise rms {bad['bf16_noise_rms']:.3g}")
    assert not bad["ok"] and bad["noise_ratio"] > 3.0
    assert bad["max_abs_diff"] < 0.5, "the old absolute bound would have passed it"


def make_tied(out: Path) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, intermediate_size=128,
        tie_word_embeddings=True, rms_norm_eps=1e-6))
    model.to(torch.bfloat16).save_pretrained(out)
    return out


@pytest.mark.slow
def test_tied_embeddings_bf16_round_trip(tmp_path):
    hf = make_tied(tmp_path / "hf")
    src = _tensors(hf)
    assert "lm_head.weight" not in src
    mcore, back = tmp_path / "mcore", tmp_path / "back"
    _ok(drpo("convert", "hf-to-mcore", "--hf", hf, "--out", mcore, "--dtype", "bf16"), "hf-to-mcore")
    _ok(drpo("convert", "mcore-to-hf", "--mcore", mcore, "--out", back), "mcore-to-hf")
    dst = _tensors(back)
    assert sorted(dst) == sorted(src)  # no extra lm_head.weight
    assert all(dst[k].dtype == torch.bfloat16 and torch.equal(src[k], dst[k]) for k in src)
    cfg = json.loads((back / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16" and cfg["tie_word_embeddings"]
