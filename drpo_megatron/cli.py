"""``drpo`` command line: train | study | dashboard | convert | plan | submit.

``drpo train`` with no arguments runs the embedded CPU default (tiny Qwen3-MoE, arithmetic task,
DRPO, one SGLang server on CPU).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _train(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="drpo train", description="Run DRPO RL training.")
    p.add_argument("--config", help="YAML run config (see model_configs/); default: embedded CPU run")
    p.add_argument("--max-steps", type=int, help="override train.max_steps")
    p.add_argument("--output-dir", help="override output_dir (run directory)")
    p.add_argument("--resume", action="store_true",
                   help="continue from <output_dir>/checkpoint (an error when there is none); "
                        "without it a run resumes automatically when a checkpoint exists "
                        "(train.resume: auto)")
    args = p.parse_args(argv)

    from drpo_megatron.config import ConfigError, load_config

    overrides: dict = {}
    if args.max_steps is not None:
        overrides.setdefault("train", {})["max_steps"] = args.max_steps
    if args.output_dir is not None:
        overrides["output_dir"] = args.output_dir
    if args.resume:
        overrides.setdefault("train", {})["resume"] = "must"
    try:
        cfg = load_config(args.config, overrides)
        from drpo_megatron.run import check_world_size

        check_world_size(cfg)  # the launch matches parallel.num_nodes * gpus_per_node
    except ConfigError as e:
        print(f"drpo train: config error: {e}", file=sys.stderr)
        return 2

    from drpo_megatron.platform import apply_cpu_compat

    apply_cpu_compat()
    from drpo_megatron.trainer import train

    last = train(cfg)
    print(f"done: {cfg.train.max_steps} steps, last reward {last.get('rollout/reward_mean', float('nan')):.3f}; "
          f"run directory {os.path.abspath(os.path.expanduser(cfg.output_dir))}")
    return 0


def _dashboard(argv: list[str]) -> int:
    from drpo_megatron import dashboard

    return dashboard.main(argv)


def _convert(argv: list[str]) -> int:
    from drpo_megatron.convert.checkpoint import main as convert_main

    return convert_main(argv)


def _plan(argv: list[str]) -> int:
    from drpo_megatron.operate.plan import main as plan_main

    return plan_main(argv)


def _submit(argv: list[str]) -> int:
    from drpo_megatron.operate.submit import main as submit_main

    return submit_main(argv)


def _study(argv: list[str]) -> int:
    from drpo_megatron.study import main as study_main

    return study_main(argv)


COMMANDS = {"train": _train, "study": _study, "dashboard": _dashboard, "convert": _convert,
            "plan": _plan, "submit": _submit}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # >1 thread per rank made gloo DDP 50x slower
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: drpo {" + ",".join(COMMANDS) + "} [options]   (drpo COMMAND --help)",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
