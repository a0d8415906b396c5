"""The embedded CPU default policy: a tiny Qwen3-MoE checkpoint and a character-level tokenizer,
built locally (nothing is fetched from a model hub) and warm-started with a short SFT phase.

Artifacts are cached under a directory keyed by a hash of everything that defines them, so a
second ``drpo train`` reuses them.  Writing is atomic (temporary folder, then rename).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from drpo_megatron.data.arithmetic import make_problems
from pydantic import Field

from drpo_megatron.schema import Section

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PRINTABLE = [chr(c) for c in range(32, 127)] + ["\n"]
VOCAB_SIZE = 128  # 3 specials + 96 characters + reserved fill; a multiple of 128 for Megatron's padding

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class TinyModelConfig(Section):
    """Architecture of the embedded Qwen3-MoE policy and its warm start."""

    hidden_size: int = Field(default=128, ge=1)
    """Hidden size of the embedded policy."""
    num_layers: int = Field(default=2, ge=1)
    """Transformer layers (each one MoE)."""
    num_heads: int = Field(default=4, ge=1)
    """Attention heads."""
    num_kv_heads: int = Field(default=2, ge=1)
    """Key/value heads (grouped-query attention)."""
    head_dim: int = Field(default=32, ge=1)
    """Per-head dimension."""
    num_experts: int = Field(default=4, ge=1)
    """Routed experts per MoE layer."""
    top_k: int = Field(default=2, ge=1)
    """Experts each token is routed to."""
    moe_intermediate_size: int = Field(default=128, ge=1)
    """FFN size of one expert."""
    max_position_embeddings: int = Field(default=256, ge=1)
    """Longest sequence (prompt + response) the policy supports."""
    seed: int = 1234
    """Seed of the random initialisation and of the warm start."""
    sft_steps: int = Field(default=300, ge=0)
    """SFT warm start steps: imitate a *noisy teacher* whose answer is right with probability
    1 - sft_label_noise and otherwise off by 1 or 2 (redrawn every time a problem is seen). The
    policy learns the format and puts the right answer as its mode, but samples it only about
    half the time at temperature 1: the headroom RL has to close."""
    sft_batch_size: int = Field(default=64, ge=1)
    """Sequences per SFT step."""
    sft_lr: float = Field(default=3e-3, gt=0)
    """SFT learning rate (AdamW)."""
    sft_label_noise: float = Field(default=0.5, ge=0, le=1)
    """Probability that the noisy teacher's answer is off by 1 or 2."""

    def cache_key(self, max_operand: int) -> str:
        payload = json.dumps({"cfg": self.model_dump(), "vocab": VOCAB_SIZE, "format": 2,
                              "max_operand": max_operand}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def build_tokenizer():
    """Character-level ``PreTrainedTokenizerFast`` with Qwen-style chat special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_list = SPECIAL_TOKENS + PRINTABLE
    vocab_list += [f"<|reserved_{i}|>" for i in range(VOCAB_SIZE - len(vocab_list))]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS + vocab_list[len(SPECIAL_TOKENS) + len(PRINTABLE):])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token="<|endoftext|>",
        model_max_length=256,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_hf_config(cfg: TinyModelConfig, tokenizer):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.moe_intermediate_size * 2,
        moe_intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        output_router_logits=False,
        torch_dtype="float32",
    )


def prompt_ids(tokenizer, question: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True,
        return_dict=False,
    )


def _sft(model, tokenizer, cfg: TinyModelConfig, max_operand: int, on_progress=None) -> list[float]:
    """Short supervised warm start on noisy demonstrations of every problem of the task
    (prompt tokens masked from the loss)."""
    n_all = (max_operand + 1) ** 2 * 2
    problems = make_problems(n_all, seed=cfg.seed, max_operand=max_operand)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    gen = torch.Generator().manual_seed(cfg.seed)
    offsets = (-2, -1, 1, 2)

    def demo(p):
        answer = int(p.answer)
        if float(torch.rand((), generator=gen)) < cfg.sft_label_noise:
            answer += offsets[int(torch.randint(len(offsets), (), generator=gen))]
        return (prompt_ids(tokenizer, p.prompt_text),
                tokenizer.encode(f"\\boxed{{{answer}}}", add_special_tokens=False) + [eos])

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (1 - s / cfg.sft_steps))
    losses = []
    model.train()
    for step in range(cfg.sft_steps):
        idx = torch.randint(len(problems), (cfg.sft_batch_size,), generator=gen).tolist()
        batch = [demo(problems[i]) for i in idx]
        width = max(len(a) + len(b) for a, b in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        attn = torch.zeros_like(ids)
        for i, (a, b) in enumerate(batch):
            seq = a + b
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, len(a): len(seq)] = torch.tensor(b)
            attn[i, : len(seq)] = 1
        out = model(input_ids=ids, attention_mask=attn, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(out.loss))
        if on_progress is not None:
            on_progress(step, float(out.loss))
    model.eval()
    return losses


def ensure_tiny_checkpoint(cache_dir: str | os.PathLike, cfg: TinyModelConfig | None = None,
                           *, max_operand: int = 9, show_progress: bool = True) -> Path:
    """Return the path of the warm-started tiny Qwen3-MoE HF checkpoint, building it if needed.

    ``max_operand`` is the arithmetic task's operand range (``task.max_operand``)."""
    from transformers import Qwen3MoeForCausalLM

    cfg = cfg or TinyModelConfig()
    root = Path(cache_dir).expanduser().resolve()
    final = root / f"tiny-qwen3-moe-{cfg.cache_key(max_operand)}"
    if (final / "drpo_tiny.json").exists():
        log.info("reusing tiny policy checkpoint %s", final)
        return final
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tokenizer = build_tokenizer()
    torch.manual_seed(cfg.seed)
    model = Qwen3MoeForCausalLM(build_hf_config(cfg, tokenizer)).float()
    log.info("building tiny Qwen3-MoE policy (%.2fM params) with %d SFT warm-start steps",
             sum(p.numel() for p in model.parameters()) / 1e6, cfg.sft_steps)
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.sft_steps, desc="warm start (SFT)", unit="step")

    def progress(step, loss):
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")

    losses = _sft(model, tokenizer, cfg, max_operand, progress)
    if bar is not None:
        bar.close()
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "drpo_tiny.json").write_text(json.dumps(
            {"config": cfg.model_dump(), "max_operand": max_operand, "sft_loss_first": losses[0] if losses else None,
             "sft_loss_last": losses[-1] if losses else None, "build_s": time.time() - t0}, indent=2))
        try:
            tmp.rename(final)
        except OSError:
            if not (final / "drpo_tiny.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("tiny policy ready at %s (%.1fs)", final, time.time() - t0)
    return final
