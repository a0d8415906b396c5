"""A stand-in for ``drpo train --config FILE`` that honours its file contract, for the study
runner's skip / resume / stop unit tests (the real CLI runs in test_study_e2e.py).

Contract kept: ``output_dir/config.yaml``; one ``metrics.jsonl`` row per step; a checkpoint
``output_dir/checkpoint/{metadata.json, trainer_state.pt (step)}`` every ``train.save_every``
steps and after the last; a restart continues after the checkpoint's step; SIGTERM = checkpoint
after the current step and exit 75.  Test controls (environment): ``STUB_LOG`` (a jsonl file:
one row per invocation with the run name and its first step), ``STUB_CRASH`` ("<run name>:<step>":
exit 3 after logging that step, before saving), ``STUB_STEP_S`` (seconds per step),
``STUB_STATES`` (a directory of ``trainer_state`` files ``step<N>.pt`` that the test wrote with
torch.save: the stub copies them instead of importing torch, which would take seconds per run on
a loaded machine; its own resume point is the ``stub_step`` file next to them).
"""

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import yaml

EXIT_PREEMPTED = 75


def save(run: Path, step: int) -> None:
    tmp = run / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / "metadata.json").write_text("{}")
    shutil.copy(Path(os.environ["STUB_STATES"]) / f"step{step}.pt", tmp / "trainer_state.pt")
    (tmp / "stub_step").write_text(str(step))
    shutil.rmtree(run / "checkpoint", ignore_errors=True)
    os.rename(tmp, run / "checkpoint")


def main() -> int:
    cfg = yaml.safe_load(Path(sys.argv[sys.argv.index("--config") + 1]).read_text())
    run = Path(cfg["output_dir"])
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    max_steps, every = cfg["train"]["max_steps"], cfg["train"]["save_every"]
    start = 1
    if (run / "checkpoint" / "stub_step").exists():
        start = int((run / "checkpoint" / "stub_step").read_text()) + 1
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    if os.environ.get("STUB_LOG"):
        with open(os.environ["STUB_LOG"], "a") as fh:
            fh.write(json.dumps({"run": cfg["name"], "start": start}) + "\n")
    crash = os.environ.get("STUB_CRASH", "")
    for step in range(start, max_steps + 1):
        time.sleep(float(os.environ.get("STUB_STEP_S", "0")))
        with open(run / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"step": step, "rollout/reward_mean": 0.1 * step,
                                 "loss/policy_loss": 0.0, "time": time.time()}) + "\n")
        if crash == f"{cfg['name']}:{step}":
            return 3
        if stop or step == max_steps or (every and step % every == 0):
            save(run, step)
        if stop and step < max_steps:
            return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
