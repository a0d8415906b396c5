"""The prompt stream: the training problems in a seeded order, reshuffled every epoch, with the
data cursor that a checkpoint saves (so a resumed run continues with the next unseen prompt).

Driver rank only (it decides what is generated); its :meth:`PromptStream.state_dict` goes into
``trainer_state.pt``.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

from drpo_megatron.data.math import DataError, encode_prompt


class PromptStream:
    """``next(k)`` -> the next ``k`` problems as (prompt token ids, the problems: ``answer``,
    ``prompt_text``, ``meta`` with the data file's fields for the reward).

    Order: epoch ``e`` is a permutation of ``problems`` drawn by ``random.Random(seed + e)``;
    the cursor counts problems handed out since step 1."""

    def __init__(self, problems: Sequence[Any], tokenizer, seed: int):
        if not problems:
            raise DataError("the training set is empty: nothing to generate from; check "
                            "task.train_file (or task.num_train) and task.max_prompt_tokens")
        self.problems = list(problems)
        self.seed = seed
        self.cursor = 0
        self.order: list[int] = []
        self._encode: Callable[[str], list[int]] = lambda text: encode_prompt(tokenizer, text)

    def next(self, k: int) -> tuple[list[list[int]], list[Any]]:
        prompts, problems = [], []
        n = len(self.problems)
        for _ in range(k):
            if self.cursor % n == 0:
                rng = random.Random(self.seed + self.cursor // n)
                self.order = list(range(n))
                rng.shuffle(self.order)
            p = self.problems[self.order[self.cursor % n]]
            self.cursor += 1
            prompts.append(self._encode(p.prompt_text))
            problems.append(p)
        return prompts, problems

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the cursor and the current epoch's order."""
        return {"cursor": self.cursor, "order": list(self.order)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = int(state.get("cursor", 0))
        self.order = [int(i) for i in state.get("order", [])]
