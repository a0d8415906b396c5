"""``drpo submit CONFIG --nodes N [--rollout-nodes M] [--dry-run]``: render and submit an sbatch script.

* Validates the config and the layout first (:mod:`drpo_megatron.operate.plan`: divisibility and
  per-GPU memory); a refusal is one line and nothing is written.
* ``--rollout-nodes M`` > 0 (default: ``parallel.rollout_nodes``) renders the *disaggregated*
  template (``slurm/disaggregated.sbatch.tmpl``): N trainer nodes + M nodes of SGLang servers
  that register with an sglang-router; the trainer waits for all of them (timeout
  ``--rollout-wait-s``) and gets the router in ``DRPO_ROUTER_URL``.  M = 0 renders the
  *colocated* template (servers on the trainer's GPUs).
* Writes ``<output_dir>/submit/<name>.sbatch`` and ``<output_dir>/submit/config.yaml`` (the
  resolved config: defaults + file + ``--nodes``/``--rollout-nodes``); each job copies it into its
  own log directory ``<log_root>/<name>-<jobid>/`` next to ``sbatch.out`` (a link to
  ``<log_root>/<name>-<jobid>.sbatch.out``), ``trainer/node-*.log``,
  ``trainer/ranks/`` (torchrun per-rank logs) and ``rollout/`` (router and per-server logs).
* ``--dry-run`` prints the script instead of calling ``sbatch`` and writes nothing.
* ``--cpus-per-task`` defaults to the fewest CPUs a node of the partition has (``sinfo``); without
  a readable cluster it must be given, and a value above every node's CPUs is refused (the job
  would pend forever).
* Every value goes into the script quoted for the shell (``shlex.quote``) in one block of
  variable assignments at its top, and is used below only as ``"$VAR"``; values that SLURM reads
  from ``#SBATCH`` lines (job name, log root, time, partition, account) must need no quoting, and
  no value may hold a control character (newline, tab, ...): refused naming the field.

Preemption (``slurm/common.sh``, :mod:`drpo_megatron.operate.preempt`): SIGUSR1
(``--signal=B:USR1@<--signal-lead-s>`` before the time limit, or ``scancel --signal=USR1 --batch``)
or SIGTERM reach the batch shell, which touches ``$DRPO_STOP_FILE``; the trainer finishes its
step, saves a checkpoint and exits with 75 (after ``--ckpt-grace-s`` the shell stops it); after
SIGUSR1 the script runs ``scontrol requeue``.  The requeued job (same id, same absolute
``output_dir``) resumes from ``<output_dir>/checkpoint`` (``train.resume: auto``).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from drpo_megatron.errors import InputError
from drpo_megatron.config import ConfigError, RunConfig, load_config
from drpo_megatron.operate.plan import PlanError, check_fits, colocated, make_plan

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "slurm"
_TIME_RE = re.compile(r"(\d+-)?\d{1,2}:\d{2}:\d{2}|\d+")
# what may stand unquoted in an #SBATCH line or a comment of the script
_JOB_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SBATCH_PATH_RE = re.compile(r"[A-Za-z0-9._/+,:@=-]+")  # no blanks, quotes, $, `, %, ~
_SLURM_WORD_RE = re.compile(r"[A-Za-z0-9._,-]+")          # partition / account names
_IFACE_RE = re.compile(r"[A-Za-z0-9._:@-]{1,15}")          # a Linux interface name (IFNAMSIZ - 1)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_PLACEHOLDER_RE = re.compile(r"\{\{(\w+)\}\}")
SINFO_TIMEOUT_S = 30
# what SLURM's clients print when they find no configuration (no SLURM_CONF, no slurm.conf, no
# DNS SRV record of a configless cluster)
_NO_CONFIG_MARKERS = ("DNS SRV", "Could not establish a configuration source",
                      "fetch_config", "Unable to contact slurm controller")


class SubmitError(InputError):
    pass


class Lines(str):
    """Script lines built here from validated values: substituted as they are."""


def _text(field: str, value: Any) -> str:
    v = str(value)
    if _CONTROL_RE.search(v):
        raise SubmitError(f"{field}={v!r} holds a control character (newline, tab, ...), which a "
                          f"job script cannot carry: remove it")
    return v


def _sbatch_word(field: str, value: str, pattern: re.Pattern, what: str) -> str:
    v = _text(field, value)
    if not pattern.fullmatch(v):
        raise SubmitError(f"{field}={v!r}: SLURM reads it unquoted from an #SBATCH line, so it "
                          f"may hold only {what}; choose another")
    return v


def _int(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SubmitError(f"{field}={value!r} must be an integer")
    return value


def _substitute(template: str, values: dict[str, Any], name: str) -> str:
    """Every ``{{KEY}}`` in one pass (a value is never scanned again): ints as digits,
    :class:`Lines` as they are, lists as shell-quoted words, anything else shell-quoted."""
    left = sorted({k for k in _PLACEHOLDER_RE.findall(template) if k not in values})
    if left:
        raise SubmitError(f"template slurm/{name}.sbatch.tmpl has unfilled placeholders {left}")

    def one(m: re.Match) -> str:
        v = values[m.group(1)]
        if isinstance(v, (Lines, int)):
            return str(v)
        if isinstance(v, list):
            return " ".join(shlex.quote(a) for a in v)
        return shlex.quote(v)

    return _PLACEHOLDER_RE.sub(one, template)


def render(cfg: RunConfig, *, nodes: int, rollout_nodes: int, resolved_config: str,
           log_root: str, time: str = "24:00:00", partition: str | None = None,
           account: str | None = None, python: str = "python", cpus_per_task: int = 64,
           rollout_wait_s: int = 1800, ckpt_grace_s: int = 600, signal_lead_s: int = 900,
           master_port: int = 29500, router_port: int = 30000, server_base_port: int = 31000,
           repo: str | Path = REPO) -> str:
    """The sbatch script text (no file written).  Refuses (:class:`SubmitError`, naming the
    field) a value the script cannot carry safely: see the module doc."""
    par = cfg.parallel
    if not _TIME_RE.fullmatch(_text("--time", time)):
        raise SubmitError(f"--time={time!r}: use SLURM's [D-]HH:MM:SS (e.g. 24:00:00) or minutes")
    if rollout_nodes < 0:
        raise SubmitError(f"--rollout-nodes={rollout_nodes} must be >= 0 (0 = colocated)")
    if signal_lead_s <= ckpt_grace_s:
        raise SubmitError(f"--signal-lead-s={signal_lead_s} must exceed --ckpt-grace-s={ckpt_grace_s}: "
                          "the checkpoint must finish before SLURM's time limit")
    if _int("--cpus-per-task", cpus_per_task) < 1:
        raise SubmitError(f"--cpus-per-task={cpus_per_task} must be >= 1 (CPUs of each node's task)")
    job_name = _sbatch_word("name", cfg.name, _JOB_NAME_RE,
                            "letters, digits and . _ - (starting with a letter or digit)")
    log_root = _sbatch_word("--log-root (default <output_dir>/slurm-logs)", log_root,
                            _SBATCH_PATH_RE, "letters, digits and . _ / + , : @ = -")
    extra_sbatch = [f"#SBATCH --{opt}={_sbatch_word(f'--{opt}', v, _SLURM_WORD_RE, 'letters, digits and . _ , -')}"
                    for opt, v in (("partition", partition), ("account", account)) if v]
    bind_interface = cfg.rollout.server.bind_interface or ""
    if bind_interface and not _IFACE_RE.fullmatch(_text("rollout.server.bind_interface",
                                                        bind_interface)):
        raise SubmitError(f"rollout.server.bind_interface={bind_interface!r} is not a network "
                          f"interface name (e.g. ib0, eth0; at most 15 of A-Z a-z 0-9 . _ : @ -)")
    disaggregated = rollout_nodes > 0
    if disaggregated and not cfg.model.hf_path:
        raise SubmitError("model.hf_path is not set: the rollout nodes' SGLang servers load the "
                          "checkpoint from that path; set it to the HF checkpoint directory")
    servers_per_node = par.gpus_per_node // par.rollout_tp
    extra_env = []
    if cfg.model.fp8:
        extra_env.append("export NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1   # blockwise FP8 training, FP32 scales")
    server_args = [_text("rollout.server.extra_args", a)  # what drpo train's own servers get
                   for a in cfg.rollout.server.extra_args]
    if cfg.train.seeded_rollouts and cfg.parallel.device == "cuda" and \
            "--enable-deterministic-inference" not in server_args:
        server_args.append("--enable-deterministic-inference")  # SGLang honours sampling_seed only then
    if cfg.rollout.precision == "fp8":
        server_args += ["--quantization", "fp8"]  # FP8 rollouts: the trainer pushes 128x128 blockwise e4m3 weights
    values: dict[str, Any] = {
        "NAME": Lines(job_name), "TRAIN_NODES": nodes, "ROLLOUT_NODES": rollout_nodes,
        "TOTAL_NODES": nodes + rollout_nodes, "GPUS_PER_NODE": par.gpus_per_node,
        "TP": par.tp, "PP": par.pp, "EP": par.ep, "DP": (nodes * par.gpus_per_node) // (par.tp * par.pp),
        "ROLLOUT_TP": par.rollout_tp, "SERVERS_PER_NODE": servers_per_node,
        "NUM_SERVERS": servers_per_node * rollout_nodes, "CPUS_PER_TASK": cpus_per_task,
        "TIME": Lines(time), "LOG_ROOT": Lines(log_root), "SIGNAL_LEAD_S": signal_lead_s,
        "CKPT_GRACE_S": ckpt_grace_s, "EXTRA_SBATCH": Lines("\n".join(extra_sbatch)),
        "EXTRA_ENV": Lines("\n".join(extra_env)),
        "REPO": _text("repository path", repo), "RESOLVED_CONFIG": _text("output_dir", resolved_config),
        "PYTHON": _text("--python", python),
        "MASTER_PORT": master_port, "ROUTER_PORT": router_port, "SERVER_BASE_PORT": server_base_port,
        "MODEL_PATH": _text("model.hf_path", cfg.model.hf_path or ""), "SERVER_ARGS": server_args,
        "BIND_INTERFACE": bind_interface, "ROLLOUT_WAIT_S": rollout_wait_s,
    }
    for k, v in values.items():  # the numbers: ints, nothing else
        if not isinstance(v, (str, list)):
            _int(k.lower(), v)
    name = "disaggregated" if disaggregated else "colocated"
    text = _substitute((TEMPLATES / f"{name}.sbatch.tmpl").read_text(), values, name)
    return re.sub(r"\n{3,}", "\n\n", text)


def _slurm_said(tool: str, stderr: str) -> str:
    """SLURM's error, with what is missing when it found no configuration at all."""
    said = stderr.strip().splitlines()[-1] if stderr.strip() else "no output"
    if any(m in stderr for m in _NO_CONFIG_MARKERS):
        conf = os.environ.get("SLURM_CONF")
        where = (f"SLURM_CONF={conf} does not work" if conf else
                 "SLURM_CONF is not set" + ("" if Path("/etc/slurm/slurm.conf").exists() else
                                            " and /etc/slurm/slurm.conf does not exist"))
        return (f"{tool} found no SLURM cluster configuration: {where} (SLURM said: {said}); "
                f"run on a login node of the cluster or set SLURM_CONF to its slurm.conf (the "
                f"local test cluster of tools/slurm_local.sh: "
                f"SLURM_CONF=/tmp/drpo-slurm/etc/slurm.conf)")
    return f"{tool} failed: {said}"


def cluster_cpus_per_node(partition: str | None) -> list[int]:
    """The CPUs of every node ``sinfo`` lists (in ``partition``); :class:`SubmitError` when it
    cannot be asked."""
    if shutil.which("sinfo") is None:
        raise SubmitError("sinfo not found on PATH")
    cmd = ["sinfo", "--noheader", "--Node", "--format=%c", *(["-p", partition] if partition else [])]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=SINFO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SubmitError(f"sinfo did not answer within {SINFO_TIMEOUT_S}s") from None
    if p.returncode != 0:
        raise SubmitError(_slurm_said("sinfo", p.stderr))
    cpus = [int(w) for w in p.stdout.split() if w.isdigit()]
    if not cpus:
        raise SubmitError(f"sinfo lists no nodes{f' in partition {partition}' if partition else ''}")
    return cpus


def resolve_cpus_per_task(given: int | None, partition: str | None) -> int:
    """``--cpus-per-task``: the given value (>= 1, and at most the CPUs of the largest node when
    the cluster can be asked) or, when not given, the CPUs of the smallest node."""
    if given is not None and given < 1:
        raise SubmitError(f"--cpus-per-task={given} must be >= 1 (CPUs of each node's task)")
    try:
        cpus = cluster_cpus_per_node(partition)
    except SubmitError as e:
        if given is not None:
            return given
        raise SubmitError(f"--cpus-per-task not given and the CPUs per node could not be read "
                          f"from the cluster ({e}); pass --cpus-per-task N") from None
    if given is None:
        return min(cpus)
    if given > max(cpus):
        raise SubmitError(f"--cpus-per-task={given} exceeds the CPUs of every node"
                          f"{f' in partition {partition}' if partition else ''} (at most "
                          f"{max(cpus)}): the job would pend forever; pass --cpus-per-task "
                          f"{min(cpus)} or fewer")
    return given


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="drpo submit", description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--nodes", type=int, required=True, help="trainer nodes")
    ap.add_argument("--rollout-nodes", type=int, default=None,
                    help="nodes of SGLang servers (default parallel.rollout_nodes; 0 = colocated)")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the script, write nothing, do not call sbatch")
    ap.add_argument("--time", default="24:00:00")
    ap.add_argument("--partition", default=None)
    ap.add_argument("--account", default=None)
    ap.add_argument("--log-root", default=None, help="default: <output_dir>/slurm-logs")
    ap.add_argument("--python", default=sys.executable, help="interpreter on the compute nodes")
    ap.add_argument("--rollout-wait-s", type=int, default=1800)
    ap.add_argument("--ckpt-grace-s", type=int, default=600)
    ap.add_argument("--signal-lead-s", type=int, default=900)
    ap.add_argument("--cpus-per-task", type=int, default=None,
                    help="CPUs per node task (default: the fewest CPUs of a node, from sinfo)")
    args = ap.parse_args(argv)
    try:
        if args.nodes < 1:
            raise SubmitError(f"--nodes={args.nodes} must be >= 1 (trainer nodes)")
        if args.rollout_nodes is not None and args.rollout_nodes < 0:
            raise SubmitError(f"--rollout-nodes={args.rollout_nodes} must be >= 0 (0 = colocated)")
        if args.cpus_per_task is not None and args.cpus_per_task < 1:
            raise SubmitError(f"--cpus-per-task={args.cpus_per_task} must be >= 1 (CPUs of each "
                              f"node's task)")
        over: dict = {"parallel": {"num_nodes": args.nodes}}
        if args.rollout_nodes is not None:
            over["parallel"]["rollout_nodes"] = args.rollout_nodes
        cfg = load_config(args.config, over)
        plan = make_plan(cfg)
        check_fits(plan, cfg)
        colocated(plan, cfg)  # a colocated layout that cannot share the GPUs: refused here too
        # absolute: the job (and its requeued runs) must find <output_dir>/checkpoint whatever
        # directory it starts in
        cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())
        out = Path(cfg.output_dir) / "submit"
        log_root = str(Path(args.log_root).expanduser().resolve()) if args.log_root else str(
            Path(cfg.output_dir).expanduser().resolve() / "slurm-logs")
        resolved = out / "config.yaml"
        kw = dict(nodes=args.nodes, rollout_nodes=cfg.parallel.rollout_nodes,
                  resolved_config=str(resolved), log_root=log_root, time=args.time,
                  partition=args.partition, account=args.account, python=args.python,
                  rollout_wait_s=args.rollout_wait_s, ckpt_grace_s=args.ckpt_grace_s,
                  signal_lead_s=args.signal_lead_s)
        render(cfg, **kw, cpus_per_task=args.cpus_per_task or 1)  # every value checked first
        cpus = resolve_cpus_per_task(args.cpus_per_task, args.partition)
        text = render(cfg, **kw, cpus_per_task=cpus)
    except (ConfigError, PlanError, SubmitError) as e:
        print(f"drpo submit: error: {e}", file=sys.stderr)
        return 2
    script = out / f"{cfg.name}.sbatch"
    if args.dry_run:
        print(text)
        print(f"# dry run: nothing written; without --dry-run drpo submit writes {script} and "
              f"{resolved} and calls sbatch", file=sys.stderr)
        return 0
    if shutil.which("sbatch") is None:
        print("drpo submit: error: sbatch not found on PATH; run on a SLURM login node or use "
              "--dry-run", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    resolved.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    script.write_text(text)
    Path(log_root).mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"drpo submit: {_slurm_said('sbatch', proc.stderr)}", file=sys.stderr)
        return proc.returncode
    job = proc.stdout.strip().split(";")[0]
    print(f"submitted job {job}; logs in {log_root}/{cfg.name}-{job}/")
    return 0
