"""tools/prepare_math_data.py on small DAPO / AIME-shaped files written here."""

import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

spec = importlib.util.spec_from_file_location(
    "prepare_math_data", Path(__file__).resolve().parents[2] / "tools" / "prepare_math_data.py")
pmd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pmd)

DAPO_Q = ("Solve the following math problem step by step. The last line of your response should be "
          "of the form Answer: $Answer (without quotes) where $Answer is the answer to the problem."
          "\n\nWhat is 2+3?\n\nRemember to put your answer on its own line after \"Answer:\".")


def _read(p):
    return [json.loads(x) for x in Path(p).read_text().splitlines()]


def test_dapo_parquet_dedupe_and_strip(tmp_path):
    rows = [{"data_source": "math_dapo", "prompt": [{"role": "user", "content": DAPO_Q}],
             "ability": "MATH", "reward_model": {"ground_truth": "5", "style": "rule-lighteval/MATH_v2"},
             "extra_info": {"index": "a1"}}] * 3
    rows.append({"data_source": "math_dapo", "prompt": [{"role": "user", "content": "Find 7*6."}],
                 "ability": "MATH", "reward_model": {"ground_truth": "42", "style": "x"},
                 "extra_info": {"index": "a2"}})
    src = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    out = tmp_path / "out" / "dapo.jsonl"
    assert pmd.main([str(src), "--out", str(out), "--strip-template"]) == 0
    got = _read(out)
    assert got == [{"prompt": "What is 2+3?", "answer": "5", "source": "dapo", "id": "a1"},
                   {"prompt": "Find 7*6.", "answer": "42", "source": "dapo", "id": "a2"}]
    assert pmd.main([str(src), "--out", str(out)]) == 0
    assert _read(out)[0]["prompt"] == DAPO_Q  # template kept without --strip-template


def test_aime_layouts(tmp_path):
    a24 = tmp_path / "aime24.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"ID": "2024-I-1", "Problem": "Find x.", "Solution": "... \\boxed{204}", "Answer": 204}]), a24)
    a25 = tmp_path / "aime25.jsonl"
    a25.write_text(json.dumps({"question": "Find y.", "answer": "70"}) + "\n"
                   + json.dumps({"problem": "No answer here."}) + "\n")
    sol = tmp_path / "sol.json"
    sol.write_text(json.dumps([{"problem": "Find z.", "solution": "so \\boxed{\\frac{1}{2}}."}]))
    out = tmp_path / "eval.jsonl"
    assert pmd.main([str(a24), str(a25), str(sol), "--out", str(out)]) == 0
    got = _read(out)
    assert [(r["prompt"], r["answer"]) for r in got] == [
        ("Find x.", "204"), ("Find y.", "70"), ("Find z.", "\\frac{1}{2}")]
    assert got[0]["id"] == "2024-I-1" and got[1]["source"] == "aime25"


@pytest.mark.parametrize("name,content,needle", [
    ("x.csv", "a,b\n", "unknown extension '.csv'"),
    ("bad.jsonl", "{not json}\n", "line 1: not JSON"),
    ("empty.jsonl", json.dumps({"text": "hi"}) + "\n", "no rows with a prompt and an answer"),
])
def test_bad_inputs_one_line(tmp_path, capsys, name, content, needle):
    p = tmp_path / name
    p.write_text(content)
    assert pmd.main([str(p), "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_missing_file(tmp_path, capsys):
    assert pmd.main([str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "file not found" in capsys.readouterr().err
