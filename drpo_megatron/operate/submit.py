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
  own log directory ``<log_root>/<name>-<jobid>/`` next to ``sbatch.out`` (a link to ``<log_root>/<name>-<jobid>.sbatch.out``), ``trainer/node-*.log``,
  ``trainer/ranks/`` (torchrun per-rank logs) and ``rollout/`` (router and per-server logs).
* ``--dry-run`` prints the script instead of calling ``sbatch``.

Preemption (``slurm/common.sh``, :mod:`drpo_megatron.operate.preempt`): SIGUSR1
(``--signal=B:USR1@<--signal-lead-s>`` before the time limit, or ``scancel --signal=USR1 --batch``)
or SIGTERM reach the batch shell, which touches ``$DRPO_STOP_FILE``; the trainer finishes its
step, saves a checkpoint and exits with 75 (after ``--ckpt-grace-s`` the shell stops it); after
SIGUSR1 the script runs ``scontrol requeue``.  The requeued job (same id, same absolute
``output_dir``) resumes from ``<output_dir>/checkpoint`` (``train.resume: auto``).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from drpo_megatron.errors import InputError
from drpo_megatron.config import ConfigError, RunConfig, load_config
from drpo_megatron.operate.plan import PlanError, check_fits, make_plan

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "slurm"
_TIME_RE = re.compile(r"^(\d+-)?\d{1,2}:\d{2}:\d{2}$|^\d+$")


class SubmitError(InputError):
    pass


def render(cfg: RunConfig, *, nodes: int, rollout_nodes: int, resolved_config: str,
           log_root: str, time: str = "24:00:00", partition: str | None = None,
           account: str | None = None, python: str = "python", cpus_per_task: int = 64,
           rollout_wait_s: int = 1800, ckpt_grace_s: int = 600, signal_lead_s: int = 900,
           master_port: int = 29500, router_port: int = 30000, server_base_port: int = 31000,
           repo: str | Path = REPO) -> str:
    """The sbatch script text (no file written)."""
    par = cfg.parallel
    if not _TIME_RE.match(time):
        raise SubmitError(f"--time={time!r}: use SLURM's [D-]HH:MM:SS (e.g. 24:00:00) or minutes")
    if rollout_nodes < 0:
        raise SubmitError(f"--rollout-nodes={rollout_nodes} must be >= 0 (0 = colocated)")
    if signal_lead_s <= ckpt_grace_s:
        raise SubmitError(f"--signal-lead-s={signal_lead_s} must exceed --ckpt-grace-s={ckpt_grace_s}: "
                          "the checkpoint must finish before SLURM's time limit")
    servers_per_node = par.gpus_per_node // par.rollout_tp
    extra_sbatch = "\n".join(
        line for line in (f"#SBATCH --partition={partition}" if partition else "",
                          f"#SBATCH --account={account}" if account else "") if line)
    extra_env = []
    if cfg.model.fp8:
        extra_env.append("export NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1   # blockwise FP8 training, FP32 scales")
    server_args = list(cfg.rollout.server.extra_args)  # the servers drpo train would launch get these
    if cfg.train.seeded_rollouts and cfg.parallel.device == "cuda" and \
            "--enable-deterministic-inference" not in server_args:
        server_args.append("--enable-deterministic-inference")  # SGLang honours sampling_seed only then
    if cfg.rollout.precision == "fp8":
        server_args.append("--quantization fp8")  # FP8 rollouts: the trainer pushes 128x128 blockwise e4m3 weights
    values = {
        "NAME": cfg.name, "TRAIN_NODES": nodes, "ROLLOUT_NODES": rollout_nodes,
        "TOTAL_NODES": nodes + rollout_nodes, "GPUS_PER_NODE": par.gpus_per_node,
        "TP": par.tp, "PP": par.pp, "EP": par.ep, "DP": (nodes * par.gpus_per_node) // (par.tp * par.pp),
        "ROLLOUT_TP": par.rollout_tp, "SERVERS_PER_NODE": servers_per_node,
        "NUM_SERVERS": servers_per_node * rollout_nodes, "CPUS_PER_TASK": cpus_per_task,
        "TIME": time, "LOG_ROOT": log_root, "SIGNAL_LEAD_S": signal_lead_s,
        "CKPT_GRACE_S": ckpt_grace_s, "EXTRA_SBATCH": extra_sbatch, "EXTRA_ENV": "\n".join(extra_env),
        "REPO": str(repo), "RESOLVED_CONFIG": resolved_config, "PYTHON": python,
        "MASTER_PORT": master_port, "ROUTER_PORT": router_port, "SERVER_BASE_PORT": server_base_port,
        "MODEL_PATH": cfg.model.hf_path, "SERVER_ARGS": " ".join(server_args),
        "ROLLOUT_WAIT_S": rollout_wait_s,
    }
    name = "disaggregated" if rollout_nodes > 0 else "colocated"
    text = (TEMPLATES / f"{name}.sbatch.tmpl").read_text()
    for k, v in values.items():
        text = text.replace("{{" + k + "}}", str(v))
    left = sorted(set(re.findall(r"\{\{(\w+)\}\}", text)))
    if left:
        raise SubmitError(f"template slurm/{name}.sbatch.tmpl has unfilled placeholders {left}")
    return re.sub(r"\n{3,}", "\n\n", text)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="drpo submit", description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--nodes", type=int, required=True, help="trainer nodes")
    ap.add_argument("--rollout-nodes", type=int, default=None,
                    help="nodes of SGLang servers (default parallel.rollout_nodes; 0 = colocated)")
    ap.add_argument("--dry-run", action="store_true", help="print the script, do not call sbatch")
    ap.add_argument("--time", default="24:00:00")
    ap.add_argument("--partition", default=None)
    ap.add_argument("--account", default=None)
    ap.add_argument("--log-root", default=None, help="default: <output_dir>/slurm-logs")
    ap.add_argument("--python", default=sys.executable, help="interpreter on the compute nodes")
    ap.add_argument("--rollout-wait-s", type=int, default=1800)
    ap.add_argument("--ckpt-grace-s", type=int, default=600)
    ap.add_argument("--signal-lead-s", type=int, default=900)
    ap.add_argument("--cpus-per-task", type=int, default=64, help="CPUs per node task")
    args = ap.parse_args(argv)
    try:
        if args.nodes < 1:
            raise SubmitError(f"--nodes={args.nodes} must be >= 1 (trainer nodes)")
        if args.rollout_nodes is not None and args.rollout_nodes < 0:
            raise SubmitError(f"--rollout-nodes={args.rollout_nodes} must be >= 0 (0 = colocated)")
        over: dict = {"parallel": {"num_nodes": args.nodes}}
        if args.rollout_nodes is not None:
            over["parallel"]["rollout_nodes"] = args.rollout_nodes
        cfg = load_config(args.config, over)
        plan = make_plan(cfg)
        check_fits(plan, cfg)
        # absolute: the job (and its requeued runs) must find <output_dir>/checkpoint whatever
        # directory it starts in
        cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())
        out = Path(cfg.output_dir) / "submit"
        log_root = str(Path(args.log_root).expanduser().resolve()) if args.log_root else str(
            Path(cfg.output_dir).expanduser().resolve() / "slurm-logs")
        resolved = out / "config.yaml"
        text = render(cfg, nodes=args.nodes, rollout_nodes=cfg.parallel.rollout_nodes,
                      resolved_config=str(resolved), log_root=log_root, time=args.time,
                      partition=args.partition, account=args.account, python=args.python,
                      rollout_wait_s=args.rollout_wait_s, ckpt_grace_s=args.ckpt_grace_s,
                      signal_lead_s=args.signal_lead_s, cpus_per_task=args.cpus_per_task)
    except (ConfigError, PlanError, SubmitError) as e:
        print(f"drpo submit: error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    resolved.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    script = out / f"{cfg.name}.sbatch"
    script.write_text(text)
    Path(log_root).mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        print(text)
        print(f"# dry run: wrote {script} and {resolved}", file=sys.stderr)
        return 0
    if shutil.which("sbatch") is None:
        print(f"drpo submit: error: sbatch not found on PATH; run on a SLURM login node or use "
              f"--dry-run (script written to {script})", file=sys.stderr)
        return 2
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"drpo submit: sbatch failed: {proc.stderr.strip()}", file=sys.stderr)
        return proc.returncode
    job = proc.stdout.strip().split(";")[0]
    print(f"submitted job {job}; logs in {log_root}/{cfg.name}-{job}/")
    return 0
