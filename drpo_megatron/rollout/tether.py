"""Tie a server's life to the trainer's: ``python -m drpo_megatron.rollout.tether PID CMD...``.

Runs ``CMD`` as its child, in the process group (session) that ``ManagedProcess.start`` made for
us, and kills that whole group (the SGLang server, its scheduler and detokenizer, or
sglang-router) as soon as the process ``PID`` (the trainer that started us) is gone, even when
the trainer died by SIGKILL and could not clean up: an orphaned CPU server otherwise burns a core
with its port open until somebody notices.  ``PR_SET_PDEATHSIG`` cannot do this for us: it fires
when the *thread* that forked exits, and the trainer restarts dead servers from short-lived
worker threads (rollout/fleet.py).

Signals: SIGTERM / SIGINT sent to the tether (the process ``ManagedProcess`` knows) are passed to
the command, and the tether exits with the command's exit code, so ``proc.poll()`` still tells
whether the server is alive.
Standard library only: it runs with the server's environment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

POLL_S = 1.0  # how often the tether looks whether the trainer is still there


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: python -m drpo_megatron.rollout.tether TRAINER_PID CMD [ARGS...]",
              file=sys.stderr)
        return 2
    parent = int(argv[0])
    child = subprocess.Popen(argv[1:])
    for sig in (signal.SIGTERM, signal.SIGINT):  # a stop: pass it on, then wait for the command
        signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    while True:
        try:
            return child.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            pass
        if os.getppid() != parent:  # re-parented: the trainer is gone
            os.killpg(os.getpgrp(), signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
