"""``drpo`` command line: train | config | study | dashboard | convert | plan | submit.

``drpo train`` with no arguments runs the embedded CPU default (tiny Qwen3-MoE, arithmetic task,
DRPO, one SGLang server on CPU).

Errors (drpo_megatron/errors.py): an expected one is printed once, from rank 0, as ``drpo
<command>: <message>`` and exits 2 (bad input) or 1 (run-time failure), without a traceback;
``--debug`` (anywhere on the command line) re-raises it with its traceback.  An unexpected
exception keeps its traceback and is followed by one line naming the logs.  Each command imports
only what it needs (a typo in a YAML file is reported in a second, before torch loads).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from drpo_megatron.errors import DrpoError

#: where the current command's logs are, for the one-line summary of an unexpected error
_CONTEXT: dict[str, str] = {}


def _train(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="drpo train", description="Run DRPO RL training.")
    p.add_argument("--config", help="YAML run config (see model_configs/); default: embedded CPU run")
    p.add_argument("--max-steps", type=int, help="override train.max_steps")
    p.add_argument("--output-dir", help="override output_dir (run directory)")
    p.add_argument("--resume", action="store_true",
                   help="continue from <output_dir>/checkpoint (an error when there is none); "
                        "without it a run resumes automatically when a checkpoint exists "
                        "(train.resume: auto)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set optim.lr=1e-5 --set "
                        "loss.params.delta=0.5 (repeatable; validated like the YAML; "
                        "`drpo config show` lists the fields)")
    args = p.parse_args(argv)

    from drpo_megatron.config import ConfigError, check_world_size, load_config

    overrides: dict = {}
    if args.max_steps is not None:
        overrides.setdefault("train", {})["max_steps"] = args.max_steps
    if args.output_dir is not None:
        overrides["output_dir"] = args.output_dir
    if args.resume:
        overrides.setdefault("train", {})["resume"] = "must"
    try:
        cfg = load_config(args.config, overrides, sets=args.set)
        check_world_size(cfg)  # the launch matches parallel.num_nodes * gpus_per_node
    except ConfigError as e:
        raise ConfigError(f"config error: {e}") from e
    _CONTEXT["logs"] = os.path.join(os.path.abspath(os.path.expanduser(cfg.output_dir)), "logs")

    from drpo_megatron.platform import apply_cpu_compat

    apply_cpu_compat()
    from drpo_megatron.trainer import train

    last = train(cfg)
    print(f"done: {cfg.train.max_steps} steps, last reward {last.get('rollout/reward_mean', float('nan')):.3f}; "
          f"run directory {os.path.abspath(os.path.expanduser(cfg.output_dir))}")
    return 0


def _config(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="drpo config", description="Inspect the run config.")
    sub = p.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="every field with its value, default and documentation")
    show.add_argument("--config", help="YAML run config; default: the embedded CPU run")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a field, as for drpo train")
    show.add_argument("--format", choices=["table", "yaml"], default="table",
                      help="table: field, value, default, doc; yaml: the resolved config")
    args = p.parse_args(argv)

    import yaml

    from drpo_megatron.config import ConfigError, describe_fields, load_config

    try:
        cfg = load_config(args.config, sets=args.set)
    except ConfigError as e:
        print(f"drpo config: config error: {e}", file=sys.stderr)
        return 2
    if args.format == "yaml":
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    for name, value, default, doc in describe_fields(cfg):
        mark = "" if value == default else "   (default: " + repr(default) + ")"
        print(f"{name} = {value!r}{mark}")
        if doc:
            print(f"    {doc}")
    return 0


def _dashboard(argv: list[str]) -> int:
    import drpo_megatron.study  # noqa: F401 - registers the study page of `drpo dashboard DIR`
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


COMMANDS = {"train": _train, "config": _config, "study": _study, "dashboard": _dashboard,
            "convert": _convert, "plan": _plan, "submit": _submit}


def _log_to_files(msg: str) -> None:
    """Put the error into the run's log files (not the console: it was printed already)."""
    record = logging.LogRecord("drpo", logging.ERROR, __file__, 0, msg, None, None)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # >1 thread per rank made gloo DDP 50x slower
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: drpo {" + ",".join(COMMANDS) + "} [options] [--debug]   (drpo COMMAND --help)",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cmd = argv[0]
    _CONTEXT.clear()
    try:
        return COMMANDS[cmd](argv[1:])
    except DrpoError as e:
        if debug:
            raise
        if _is_rank0():  # every rank raises it; the user reads it once
            print(f"drpo {cmd}: {e}", file=sys.stderr)
        _log_to_files(f"{type(e).__name__}: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        print(f"drpo {cmd}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: keep the traceback, add where to look
        traceback.print_exc()
        where = f"; logs: {_CONTEXT['logs']}" if "logs" in _CONTEXT else ""
        print(f"drpo {cmd}: unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
              f"{where} (this is a bug: please report it with the traceback above)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
