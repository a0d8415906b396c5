"""Run a study: every planned run is one ``drpo train`` subprocess in its own directory.

Resumable: a run is **finished** when its own files say so -- ``metrics.jsonl`` has a row for
step ``train.max_steps`` and the run's checkpoint (``checkpoint/`` or the ``checkpoint.old/``
a killed save leaves, as ``drpo train``'s resume finds it) is of that step
(``trainer_state.pt``).  Finished runs are skipped; any other run directory with files is
**interrupted** and is started again with the same command, where ``drpo train`` continues from
its last checkpoint (``train.resume: auto``; a run without one starts over at step 1, and the
dashboard reads the restarted timeline as a resume).

Runs execute one after another (``parallel=1``) or ``parallel`` at a time; each run's stdout and
stderr go to ``<run>/logs/drpo_train.out``.  The study appends one JSON line per run start / end
to ``DIR/study_log.jsonl`` (durations feed the ETA; it decides nothing about state).  A failed
run (non-zero exit) does not stop the others; the study exits 1 listing them.  SIGINT / SIGTERM
are forwarded to the running ``drpo train`` processes as SIGTERM: they checkpoint after the
current step and exit (75); a second Ctrl-C forwards a second SIGTERM (the trainer then exits at
once, without checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import yaml

from drpo_megatron.study.spec import (RESOLVED_SPEC_FILE, RUN_CONFIG_FILE, PlannedRun,
                                      StudySpecError)

log = logging.getLogger(__name__)

__all__ = ["RunState", "run_state", "check_existing", "run_study", "StudyResult",
           "DEFAULT_TRAIN_COMMAND", "STUDY_LOG", "TRAIN_OUTPUT"]

#: ``drpo train`` as a subprocess of this Python (the real CLI; ``--config`` is appended).
DEFAULT_TRAIN_COMMAND = (sys.executable, "-m", "drpo_megatron.cli", "train")
STUDY_LOG = "study_log.jsonl"
TRAIN_OUTPUT = "logs/drpo_train.out"
#: Exit code of a ``drpo train`` stopped by SIGTERM after checkpointing (operate/preempt.py).
EXIT_PREEMPTED = 75


@dataclass
class RunState:
    """``state``: "finished" | "interrupted" | "new"; ``last_step``: the highest step in
    metrics.jsonl (None: no row); ``checkpoint_step``: the step of the run's checkpoint."""

    state: str
    last_step: Optional[int] = None
    checkpoint_step: Optional[int] = None


def _last_logged_step(metrics: Path) -> Optional[int]:
    """Highest ``step`` in metrics.jsonl (a torn last line of a killed run is ignored)."""
    last = None
    try:
        lines = metrics.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            s = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue
        if isinstance(s, int) and not isinstance(s, bool):
            last = s if last is None else max(last, s)
    return last


def _checkpoint_step(run_dir: Path) -> Optional[int]:
    """The step of the checkpoint ``drpo train`` would resume from, None when there is none."""
    from drpo_megatron.training.checkpoint import find_checkpoint

    ckpt = find_checkpoint(run_dir / "checkpoint")
    if ckpt is None or not (ckpt / "trainer_state.pt").exists():
        return None
    import torch

    try:
        state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt file: not finished, drpo train will say more
        log.warning("%s: unreadable trainer_state.pt (%s)", ckpt, e)
        return None
    step = state.get("step") if isinstance(state, dict) else None
    return int(step) if isinstance(step, int) else None


def run_state(run_dir: str | Path, max_steps: int) -> RunState:
    """Finished / interrupted / new, from the run's own files (module docstring)."""
    d = Path(run_dir)
    if not d.is_dir() or not any(p.name != RUN_CONFIG_FILE for p in d.iterdir()):
        return RunState("new")
    last = _last_logged_step(d / "metrics.jsonl")
    ckpt = _checkpoint_step(d)
    if last is not None and last >= max_steps and ckpt is not None and ckpt >= max_steps:
        return RunState("finished", last, ckpt)
    return RunState("interrupted", last, ckpt)


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def check_existing(runs: Sequence[PlannedRun]) -> None:
    """A run directory made from a different config is an error (before anything starts):
    skipping or resuming it would mix two experiments.  ``output_dir`` may differ (a moved
    study directory)."""
    for r in runs:
        p = r.run_dir / RUN_CONFIG_FILE
        if not p.exists():
            continue
        old = yaml.safe_load(p.read_text()) or {}
        diffs = [d for d in _diff({**old, "output_dir": None}, {**r.config, "output_dir": None})]
        if diffs:
            raise StudySpecError(
                f"run {r.run_id}: {r.run_dir} was made with a different config ({'; '.join(diffs[:5])}"
                f"{' ...' if len(diffs) > 5 else ''}); use a new --out directory, or delete that run "
                "directory to redo it with the current spec")


@dataclass
class StudyResult:
    total: int
    skipped: list[str] = field(default_factory=list)    # finished before this invocation
    completed: list[str] = field(default_factory=list)  # finished by this invocation
    failed: list[tuple[str, int]] = field(default_factory=list)  # (run id, exit code)
    stopped: list[str] = field(default_factory=list)    # stopped by a signal (resumable)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.stopped


def _fmt_s(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


class _Progress:
    """runs done / total and the estimated time left: the mean duration of the runs this study
    has completed (study_log.jsonl, earlier invocations included) x runs left / parallel."""

    def __init__(self, total: int, done: int, parallel: int, durations: list[float],
                 stream=None):
        from tqdm import tqdm

        self.total, self.done, self.parallel = total, done, parallel
        self.durations = list(durations)
        self.stream = stream if stream is not None else sys.stderr
        self.bar = tqdm(total=total, initial=done, unit="run", desc="study", dynamic_ncols=True,
                        bar_format="{desc}: {n_fmt}/{total_fmt} runs |{bar}| {postfix}",
                        disable=not self.stream.isatty(), file=self.stream)
        self._update_postfix()

    def eta(self) -> Optional[float]:
        if not self.durations:
            return None
        left = self.total - self.done
        return sum(self.durations) / len(self.durations) * left / max(self.parallel, 1)

    def _update_postfix(self) -> None:
        eta = self.eta()
        self.bar.set_postfix_str("ETA " + (_fmt_s(eta) if eta is not None else "after the first run"))

    def finished(self, run_id: str, seconds: float, ok: bool) -> None:
        if ok:
            self.done += 1
            self.durations.append(seconds)
            self.bar.update(1)
        self._update_postfix()
        eta = self.eta()
        msg = (f"[{self.done}/{self.total}] {run_id} {'finished' if ok else 'did not finish'} in "
               f"{_fmt_s(seconds)}; ETA {_fmt_s(eta) if eta is not None else 'unknown'}")
        if self.bar.disable:
            print(msg, file=self.stream, flush=True)
        else:
            self.bar.write(msg, file=self.stream)

    def close(self) -> None:
        self.bar.close()


def _log_event(out_dir: Path, **event) -> None:
    with open(out_dir / STUDY_LOG, "a") as fh:
        fh.write(json.dumps({"time": time.time(), **event}) + "\n")


def _past_durations(out_dir: Path) -> list[float]:
    p = out_dir / STUDY_LOG
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") == "end" and e.get("state") == "finished":
            out.append(float(e.get("seconds", 0.0)))
    return out


class _Launcher:
    """Starts ``drpo train`` processes and forwards stop requests to them."""

    def __init__(self, train_command: Sequence[str], env: dict):
        self.cmd, self.env = list(train_command), env
        self.procs: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.stopping = 0

    def run(self, r: PlannedRun) -> int:
        (r.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        cfg_path = r.run_dir / RUN_CONFIG_FILE
        cfg_path.write_text(yaml.safe_dump(r.config, sort_keys=False))
        with open(r.run_dir / TRAIN_OUTPUT, "a") as fh:
            fh.write(f"==== drpo study: {time.strftime('%Y-%m-%d %H:%M:%S')} {r.run_id}\n")
            fh.flush()
            with self.lock:
                if self.stopping:
                    return EXIT_PREEMPTED
                # its own session: a terminal's Ctrl-C reaches only the study, which forwards
                # SIGTERM so the trainer checkpoints first
                proc = subprocess.Popen([*self.cmd, "--config", str(cfg_path)], stdout=fh,
                                        stderr=subprocess.STDOUT, env=self.env,
                                        start_new_session=True)
                self.procs[r.run_id] = proc
            try:
                return proc.wait()
            finally:
                with self.lock:
                    self.procs.pop(r.run_id, None)

    def stop(self) -> None:
        with self.lock:
            self.stopping += 1
            for proc in self.procs.values():
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass


def run_study(runs: Sequence[PlannedRun], out_dir: str | Path, *, parallel: int = 1,
              train_command: Sequence[str] = DEFAULT_TRAIN_COMMAND,
              env: Optional[dict] = None, stream=None,
              on_run_end: Optional[Callable[[PlannedRun, int], None]] = None) -> StudyResult:
    """Run every planned run that is not finished (module docstring).  ``train_command``: the
    ``drpo train`` command (``--config <run>/study_run.yaml`` is appended).  Installs SIGINT /
    SIGTERM handlers when called from the main thread."""
    if parallel < 1:
        raise ValueError(f"--parallel {parallel}: must be >= 1")
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not (out / RESOLVED_SPEC_FILE).exists():
        raise StudySpecError(f"{out}: no {RESOLVED_SPEC_FILE}; write the resolved spec first")
    check_existing(runs)
    result = StudyResult(total=len(runs))
    todo = []
    for r in runs:
        st = run_state(r.run_dir, r.max_steps)
        if st.state == "finished":
            result.skipped.append(r.run_id)
        else:
            todo.append((r, st))
    env = dict(os.environ if env is None else env)
    env.setdefault("OMP_NUM_THREADS", "1")
    launcher = _Launcher(train_command, env)
    progress = _Progress(len(runs), len(result.skipped), parallel, _past_durations(out), stream)
    msg = (f"study {out}: {len(runs)} runs, {len(result.skipped)} finished already, "
           f"{sum(st.state == 'interrupted' for _, st in todo)} to resume, "
           f"{sum(st.state == 'new' for _, st in todo)} new; {parallel} at a time")
    print(msg, file=progress.stream, flush=True)

    def on_signal(signum, frame):
        print(f"\nstudy: {signal.Signals(signum).name}: asking running trainers to checkpoint and "
              "stop (again = stop at once, no checkpoint)", file=progress.stream, flush=True)
        launcher.stop()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)

    def one(r: PlannedRun, st: RunState) -> tuple[PlannedRun, int, float]:
        t0 = time.time()
        _log_event(out, event="start", run=r.run_id, state=st.state, last_step=st.last_step)
        rc = launcher.run(r)
        return r, rc, time.time() - t0

    try:
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            pending: set[Future] = set()
            it = iter(todo)
            for r, st in it:
                pending.add(pool.submit(one, r, st))
                if len(pending) >= parallel:
                    break
            while pending:
                done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                for f in done:
                    r, rc, secs = f.result()
                    state = run_state(r.run_dir, r.max_steps).state
                    _log_event(out, event="end", run=r.run_id, returncode=rc, state=state,
                               seconds=secs)
                    if state == "finished":
                        result.completed.append(r.run_id)
                    elif launcher.stopping or rc == EXIT_PREEMPTED:
                        result.stopped.append(r.run_id)
                    else:
                        result.failed.append((r.run_id, rc if rc != 0 else -1))
                        print(f"study: {r.run_id} failed (exit {rc}); see "
                              f"{r.run_dir / TRAIN_OUTPUT}", file=progress.stream, flush=True)
                    progress.finished(r.run_id, secs, state == "finished")
                    if on_run_end is not None:
                        on_run_end(r, rc)
                    if not launcher.stopping:
                        nxt = next(it, None)
                        if nxt is not None:
                            pending.add(pool.submit(one, *nxt))
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
        progress.close()
    if launcher.stopping:
        result.stopped += [r.run_id for r, _ in todo
                           if r.run_id not in result.completed + result.stopped
                           and r.run_id not in [f for f, _ in result.failed]]
    return result
