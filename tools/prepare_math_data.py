#!/usr/bin/env python
"""Convert local math datasets (parquet / jsonl / json, no hub access) into the training jsonl
format: one object per line ``{"prompt": str, "answer": str, "source": str, "id": str}``.

Recognised layouts (detected per row):

* DAPO-Math-17k (``BytedTsinghua-SIA/DAPO-Math-17k``): ``prompt`` is a chat list
  ``[{"role": "user", "content": ...}]``, answer in ``reward_model.ground_truth``.  The original
  parquet repeats every problem many times: rows are de-duplicated by prompt.  ``--strip-template``
  removes DAPO's instruction wrapper ("Solve the following math problem step by step ..." /
  "Remember to put your answer on its own line after \\"Answer:\\"") and keeps the problem.
* AIME 2024 (``Maxwell-Jia/AIME_2024``): ``Problem`` / ``Answer`` (``ID`` as id).
* AIME 2025 (``opencompass/AIME2025``, ``yentinglin/aime_2025``): ``question`` or ``problem`` /
  ``answer``.
* Generic: a prompt in one of prompt/problem/question (any case), an answer in answer /
  ground_truth / final_answer, or the last ``\\boxed{...}`` of a ``solution``.

Usage::

    python tools/prepare_math_data.py --out data/dapo_math_17k.jsonl dapo-math-17k.parquet --strip-template
    python tools/prepare_math_data.py --out data/aime_2024.jsonl aime_2024/train.parquet
    python tools/prepare_math_data.py --out data/aime_2025.jsonl aime2025-I.jsonl aime2025-II.jsonl

Rows without a usable prompt or answer are skipped and counted; the summary goes to stderr.
Exit code 2 with a one-line error for unreadable inputs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterator

PROMPT_KEYS = ("prompt", "problem", "question")
ANSWER_KEYS = ("answer", "ground_truth", "final_answer", "expected_answer")
DAPO_PREFIX = re.compile(r"^\s*Solve the following math problem step by step\..*?\n\n", re.S)
DAPO_SUFFIX = re.compile(r"\n\nRemember to put your answer on its own line after \"Answer:\"\.?\s*$")


class DataError(ValueError):
    pass


def read_rows(path: Path) -> Iterator[dict]:
    suffix = path.suffix.lower()
    if not path.is_file():
        raise DataError(f"input {str(path)!r}: file not found; pass local .parquet/.jsonl/.json files")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types
            raise DataError(f"input {str(path)!r}: not a readable parquet file ({e})") from e
        yield from table.to_pylist()
    elif suffix in (".jsonl", ".ndjson"):
        with path.open() as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"input {str(path)!r} line {n}: not JSON ({e.msg}); "
                                        "jsonl needs one object per line") from e
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"input {str(path)!r}: not JSON ({e.msg})") from e
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), [data])
        yield from data
    else:
        raise DataError(f"input {str(path)!r}: unknown extension {suffix!r}; use .parquet, .jsonl or .json")


def _get(row: dict, keys) -> Any:
    lower = {str(k).lower(): v for k, v in row.items()}
    for k in keys:
        if k in lower and lower[k] not in (None, ""):
            return lower[k]
    return None


def last_boxed(text: str) -> str | None:
    i = text.rfind("\\boxed{")
    if i < 0:
        return None
    depth, start = 0, i + len("\\boxed{")
    for j in range(start, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            if depth == 0:
                return text[start:j].strip()
            depth -= 1
    return None


def extract(row: dict, strip_template: bool = False) -> tuple[str, str] | None:
    prompt = _get(row, PROMPT_KEYS)
    if isinstance(prompt, list):  # chat format: the (last) user turn
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        prompt = users[-1] if users else None
    answer = _get(row, ANSWER_KEYS)
    rm = row.get("reward_model")
    if answer is None and isinstance(rm, dict):
        answer = rm.get("ground_truth")
    if answer is None and isinstance(_get(row, ("solution",)), str):
        answer = last_boxed(_get(row, ("solution",)))
    if not isinstance(prompt, str) or not prompt.strip() or answer is None or str(answer).strip() == "":
        return None
    if strip_template:
        prompt = DAPO_SUFFIX.sub("", DAPO_PREFIX.sub("", prompt))
    answer = str(answer).strip()
    if re.fullmatch(r"-?\d+\.0", answer):  # AIME answers stored as floats
        answer = answer[:-2]
    return prompt.strip(), answer


def convert(inputs: list[Path], out: Path, *, strip_template: bool = False, dedupe: bool = True,
            max_rows: int | None = None, source: str | None = None) -> dict:
    seen: set[str] = set()
    stats = {"read": 0, "written": 0, "skipped_no_prompt_or_answer": 0, "duplicates": 0}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w") as f:
        for path in inputs:
            for i, row in enumerate(read_rows(path)):
                stats["read"] += 1
                if not isinstance(row, dict):
                    stats["skipped_no_prompt_or_answer"] += 1
                    continue
                got = extract(row, strip_template)
                if got is None:
                    stats["skipped_no_prompt_or_answer"] += 1
                    continue
                prompt, answer = got
                if dedupe and prompt in seen:
                    stats["duplicates"] += 1
                    continue
                seen.add(prompt)
                rid = _get(row, ("id", "index"))
                if rid is None and isinstance(row.get("extra_info"), dict):
                    rid = row["extra_info"].get("index")
                f.write(json.dumps({"prompt": prompt, "answer": answer,
                                    "source": source or path.stem,
                                    "id": str(rid if rid is not None else f"{path.stem}-{i}")},
                                   ensure_ascii=False) + "\n")
                stats["written"] += 1
                if max_rows and stats["written"] >= max_rows:
                    break
            if max_rows and stats["written"] >= max_rows:
                break
    tmp.replace(out)
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--strip-template", action="store_true", help="drop DAPO's instruction wrapper")
    ap.add_argument("--no-dedupe", action="store_true")
    ap.add_argument("--max-rows", type=int, default=None)
    ap.add_argument("--source", default=None, help="source tag (default: input file stem)")
    args = ap.parse_args(argv)
    try:
        stats = convert(args.inputs, args.out, strip_template=args.strip_template,
                        dedupe=not args.no_dedupe, max_rows=args.max_rows, source=args.source)
    except DataError as e:
        print(f"prepare_math_data: error: {e}", file=sys.stderr)
        return 2
    if stats["written"] == 0:
        print(f"prepare_math_data: error: no rows with a prompt and an answer in {[str(p) for p in args.inputs]}; "
              f"expected fields {PROMPT_KEYS} and {ANSWER_KEYS} (or reward_model.ground_truth)",
              file=sys.stderr)
        return 2
    print(f"prepare_math_data: {stats} -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
