"""The paper's task: math problems with a reference answer, from local jsonl files.

Files come from ``tools/prepare_math_data.py`` (DAPO-Math-17k for training, AIME 2024 / 2025 for
evaluation): one object per line ``{"prompt": str, "answer": str, "source"?: str, "id"?: str,
...}``.  Every field except ``prompt`` (``answer``, ``source``, ``id`` and any other field of the
row) is the problem's ``meta``, which the reward function receives (docs/rewards.md).
The prompt shown to the model is ``task.prompt_template`` with ``{problem}`` replaced, wrapped in
the tokenizer's chat template when it has one (Qwen3 base checkpoints ship one), so the answer
lands in ``\\boxed{}`` where the math-verify reward looks for it.

Training order, the epoch reshuffle and the data cursor are the loop's (``data/prompts.py``);
evaluation reports avg@k per source file (``eval/<source>/avg@k``) and over all of them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from drpo_megatron.errors import InputError

from drpo_megatron.data.arithmetic import train_eval_split

log = logging.getLogger(__name__)

# Qwen's math-evaluation instruction: the answer goes into \boxed{} (math-verify parses it)
DEFAULT_PROMPT_TEMPLATE = ("{problem}\n\nPlease reason step by step, and put your final answer "
                           "within \\boxed{{}}.")


@dataclass(frozen=True)
class MathProblem:
    problem: str
    answer: str
    source: str = ""
    template: str = DEFAULT_PROMPT_TEMPLATE
    # the row's fields except "prompt" (answer as a string): what the reward function sees
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def prompt_text(self) -> str:
        return self.template.format(problem=self.problem)


class DataError(InputError):
    """A task file is missing or malformed; the message names the file, the line and the fix."""


def load_math_jsonl(path: str | Path, *, template: str = DEFAULT_PROMPT_TEMPLATE,
                    source: str | None = None) -> list[MathProblem]:
    """Every row of a prepared jsonl file; ``source`` defaults to the row's ``source`` field,
    else the file name without extension."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: no such task file; make one with tools/prepare_math_data.py")
    out: list[MathProblem] = []
    try:
        lines = p.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line_no = p.read_bytes()[:e.start].count(b"\n") + 1
        raise DataError(f"{p}:{line_no}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); save the "
                        "file as UTF-8 (tools/prepare_math_data.py writes it so)") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{n}: not JSON ({e.msg}); the file must be jsonl from "
                            "tools/prepare_math_data.py") from None
        prompt, answer = row.get("prompt") if isinstance(row, dict) else None, \
            row.get("answer") if isinstance(row, dict) else None
        if not isinstance(prompt, str) or not prompt.strip() or answer in (None, ""):
            raise DataError(f"{p}:{n}: needs a non-empty string 'prompt' and an 'answer' "
                            f"(got keys {sorted(row) if isinstance(row, dict) else type(row).__name__})")
        meta = {**{k: v for k, v in row.items() if k != "prompt"}, "answer": str(answer)}
        out.append(MathProblem(prompt, str(answer), source or row.get("source") or p.stem,
                               template, meta))
    if not out:
        raise DataError(f"{p}: no problems in the file")
    return out


def check_template(template: str) -> None:
    try:
        text = template.format(problem="P")
    except (KeyError, IndexError, ValueError) as e:
        raise DataError(f"task.prompt_template={template!r}: {e!r}; use {{problem}} for the "
                        "problem and {{}} for a literal brace pair") from None
    if "P" not in text:
        raise DataError(f"task.prompt_template={template!r} has no {{problem}} placeholder")


def drop_long_prompts(problems: Sequence[MathProblem], encode: Callable[[str], list[int]],
                      max_tokens: int, what: str) -> list[MathProblem]:
    """Problems whose encoded prompt has at most ``max_tokens`` tokens (0 = all); logs the count
    dropped and raises when nothing is left."""
    if max_tokens <= 0:
        return list(problems)
    kept = [p for p in problems if len(encode(p.prompt_text)) <= max_tokens]
    if len(kept) < len(problems):
        log.info("%s: dropped %d of %d problems longer than task.max_prompt_tokens=%d",
                 what, len(problems) - len(kept), len(problems), max_tokens)
    if not kept:
        raise DataError(f"{what}: every prompt is longer than task.max_prompt_tokens={max_tokens}; "
                        "raise it")
    return kept


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt token ids: the chat template (user turn + generation prompt) when the tokenizer has
    one, else the plain text."""
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
            return_dict=False))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def load_task(task, tokenizer) -> tuple[list, list]:
    """(train problems, eval problems) of a :class:`~drpo_megatron.config.TaskConfig`; every
    problem has ``prompt_text``, ``answer`` and ``source``."""
    if task.kind == "arithmetic":
        return train_eval_split(task.num_train, task.num_eval, seed=task.seed,
                                max_operand=task.max_operand)
    check_template(task.prompt_template)
    encode = lambda text: encode_prompt(tokenizer, text)  # noqa: E731
    train = drop_long_prompts(load_math_jsonl(task.train_file, template=task.prompt_template),
                              encode, task.max_prompt_tokens, task.train_file)
    evals: list[MathProblem] = []
    for f in task.eval_files:
        evals += drop_long_prompts(load_math_jsonl(f, template=task.prompt_template,
                                                   source=Path(f).stem),
                                   encode, task.max_prompt_tokens, f)
    if not evals:
        raise DataError("task.eval_files=[]: task.kind='math' evaluates on held-out files (e.g. "
                        "AIME 2024 and 2025 from tools/prepare_math_data.py)")
    log.info("math task: %d train problems (%s), %d eval problems (%s)", len(train),
             task.train_file, len(evals), ", ".join(map(str, task.eval_files)))
    return train, evals
