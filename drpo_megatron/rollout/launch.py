"""``python -m drpo_megatron.rollout.launch COMMAND ...``: start stock SGLang / sglang-router
with the run's API key, and the router calls of the SLURM scripts.

Commands (the key comes from the 0600 file named by ``$DRPO_API_KEY_FILE``, see
:mod:`drpo_megatron.rollout.auth`; it never appears in a command line or a log):

* ``sglang ARGS...``: ``python -m sglang.launch_server ARGS... --api-key KEY`` run in this
  process (SGLang 0.5.23 reads the key only from its arguments or a ``--config`` file; both
  would show it: in ``ps``, or in the ``server_args=...`` line SGLang logs at start-up, which
  this wrapper redacts).
* ``router ARGS...``: ``python -m sglang_router.launch_router ARGS...`` plus the key flags of
  :func:`~drpo_megatron.rollout.auth.router_key_args`, run in this process.
* ``register ROUTER_URL WORKER_URL``: ``POST ROUTER_URL/workers {"url": WORKER_URL}``.
* ``workers ROUTER_URL``: prints how many workers the router lists as healthy (0 when it cannot
  be asked).
* ``new-key FILE``: writes a new random key to FILE (0600).
"""

from __future__ import annotations

import runpy
import sys

from drpo_megatron.rollout.auth import (API_KEY_FILE_ENV, ApiKey, ApiKeyError, create_key_file,
                                        key_from_env, router_key_args)

REDACTED = "<redacted>"
REQUEST_TIMEOUT_S = 30.0
# the fields of SGLang's ServerArgs that hold secrets (server_args.py, arg_groups/fields/serving.py)
SGLANG_SECRET_FIELDS = ("api_key", "admin_api_key", "ssl_keyfile_password")


def _key() -> ApiKey:
    key = key_from_env()
    if key is None:
        raise ApiKeyError(f"{API_KEY_FILE_ENV} is not set: it must name the 0600 file that holds "
                          f"the API key (make one with `python -m drpo_megatron.rollout.launch "
                          f"new-key FILE`)")
    return key


def redact_server_args_log() -> None:
    """Make SGLang's start-up line ``server_args={...}`` show ``<redacted>`` for the secrets."""
    from sglang.srt.entrypoints import engine

    original = engine._server_args_for_logging
    if getattr(original, "_drpo_redacted", False):
        return

    def redacted(server_args):
        d = original(server_args)
        for k in SGLANG_SECRET_FIELDS:
            if d.get(k):
                d[k] = REDACTED
        return d

    redacted._drpo_redacted = True
    engine._server_args_for_logging = redacted


def sglang_argv(argv: list[str], key: ApiKey) -> list[str]:
    """SGLang's arguments plus the key (``--api-key=KEY``: a key may begin with "-")."""
    return [*argv, f"--api-key={key.key}"]


def sglang(argv: list[str]) -> None:
    key = _key()
    redact_server_args_log()
    sys.argv = ["sglang.launch_server", *sglang_argv(argv, key)]
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)


def router(argv: list[str]) -> None:
    key = _key()
    from sglang_router.launch_router import launch_router, parse_router_args

    launch_router(parse_router_args([*argv, *router_key_args(key)]))


def register(router_url: str, worker_url: str) -> int:
    import requests

    url = router_url.rstrip("/") + "/workers"
    try:
        r = requests.post(url, json={"url": worker_url}, headers=_key().headers(),
                          timeout=REQUEST_TIMEOUT_S)
    except requests.RequestException as e:
        print(f"[drpo] cannot register {worker_url} with {url}: {e}", file=sys.stderr)
        return 1
    if r.status_code >= 300:
        print(f"[drpo] registering {worker_url} with {url}: HTTP {r.status_code}: {r.text[:300]}",
              file=sys.stderr)
        return 1
    print(f"[drpo] registered {worker_url} with {router_url}")
    return 0


def workers(router_url: str) -> int:
    import requests

    try:
        r = requests.get(router_url.rstrip("/") + "/workers", headers=_key().headers(),
                         timeout=REQUEST_TIMEOUT_S)
        r.raise_for_status()
        ws = r.json().get("workers", [])
    except (requests.RequestException, ValueError, AttributeError):
        ws = []
    print(sum(1 for w in ws if isinstance(w, dict) and w.get("is_healthy", True)))
    return 0


USAGE = ("usage: python -m drpo_megatron.rollout.launch sglang ARGS... | router ARGS... | "
         "register ROUTER_URL WORKER_URL | workers ROUTER_URL | new-key FILE")


def main(argv: list[str]) -> int:
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "sglang":
            sglang(rest)
            return 0
        if cmd == "router":
            router(rest)
            return 0
        if cmd == "register" and len(rest) == 2:
            return register(*rest)
        if cmd == "workers" and len(rest) == 1:
            return workers(rest[0])
        if cmd == "new-key" and len(rest) == 1:
            create_key_file(rest[0])
            return 0
    except ApiKeyError as e:
        print(f"drpo launch {cmd}: error: {e}", file=sys.stderr)
        return 2
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
