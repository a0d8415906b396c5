"""Config section of the task (``task:``): what the policy is trained and evaluated on."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from drpo_megatron.data.math import DEFAULT_PROMPT_TEMPLATE
from drpo_megatron.schema import Section

#: "arithmetic": the built-in a+b / a-b task of the embedded default (data/arithmetic.py);
#: "math": jsonl files {prompt, answer} (data/math.py, the paper's recipe).
TaskKind = Literal["arithmetic", "math"]


class TaskConfig(Section):
    """Training and held-out problems."""

    kind: TaskKind = "arithmetic"
    """"arithmetic" (built in) or "math" (jsonl from tools/prepare_math_data.py)."""
    num_train: int = Field(default=160, ge=1)
    """arithmetic: RL-train problems (a+b and a-b with operands in [0, max_operand]: 2 *
    (max_operand + 1)^2 problems in all, split into disjoint train and eval sets)."""
    num_eval: int = Field(default=40, ge=1)
    """arithmetic: held-out problems."""
    max_operand: int = Field(default=9, ge=1)
    """arithmetic: largest operand."""
    seed: int = 0
    """arithmetic: seed of the train/eval split."""
    train_file: str = ""
    """math: jsonl {prompt, answer} to train on (e.g. DAPO-Math-17k from
    tools/prepare_math_data.py); checked here, or at run time on the nodes for parallel.device:
    cuda."""
    eval_files: list[str] = Field(default_factory=list)
    """math: held-out jsonl files (e.g. AIME 2024/2025): eval/<file stem>/avg@k each."""
    max_prompt_tokens: int = Field(default=0, ge=0)
    """math: prompts longer than this many tokens are dropped (0 = no limit)."""
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    """math: the user message, {problem} replaced by the problem, inside the tokenizer's chat
    template."""
