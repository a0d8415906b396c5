"""The API key of the SGLang servers and the sglang-router a run talks to (docs/operate.md,
"Security").

* One random secret per run, :func:`create_key_file`: ``secrets.token_urlsafe(32)`` (256 bits)
  written to a file only its owner can read (mode 0600, directory 0700).  ``drpo train`` makes
  ``<output_dir>/secrets/api_key`` at every start (its servers are new at every start);
  ``slurm/disaggregated.sbatch.tmpl`` makes ``<job log dir>/secrets/api_key``.
* It reaches the processes we start as the *path* of that file in the environment variable
  ``DRPO_API_KEY_FILE`` (never the key itself): :mod:`drpo_megatron.rollout.launch` reads it and
  hands it to SGLang (``--api-key``) or sglang-router (``--api-key``,
  ``--control-plane-api-keys``) inside the process, so the key is in no command line (``ps``)
  and in no log.
* Our clients send ``Authorization: Bearer <key>`` on every request (:meth:`ApiKey.headers`).
* Engines somebody else runs (``rollout.router_url``): their key file is ``rollout.api_key_file``
  or ``$DRPO_API_KEY_FILE`` (:func:`read_key_file` checks it).

This module imports nothing heavy: the launch wrapper imports it before SGLang.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

API_KEY_FILE_ENV = "DRPO_API_KEY_FILE"
KEY_BYTES = 32  # secrets.token_urlsafe(32): 256 random bits, 43 characters
# what a key file may hold: ours (URL-safe base64) and the usual bearer-token alphabets; at least
# 16 characters so that a placeholder such as "changeme" is refused
KEY_RE = re.compile(r"[A-Za-z0-9._~+/=-]{16,512}")
OWNER_ONLY = 0o600
# the sglang-router control-plane key entry: id:name:role:key (sglang-router 0.3.2)
ROUTER_KEY_ID = "drpo"


class ApiKeyError(ValueError):
    """A key file that is missing, readable by others or malformed (the message says the fix)."""


@dataclass(frozen=True)
class ApiKey:
    """A key and the 0600 file it lives in.  ``repr`` never shows the key."""

    path: Path
    key: str = field(repr=False)

    def headers(self) -> dict[str, str]:
        """The header every request of ours carries."""
        return {"Authorization": f"Bearer {self.key}"}

    def env(self) -> dict[str, str]:
        """What a process started through :mod:`drpo_megatron.rollout.launch` needs."""
        return {API_KEY_FILE_ENV: str(self.path)}

    def __str__(self) -> str:
        return f"the API key in {self.path}"


def create_key_file(path: str | os.PathLike) -> ApiKey:
    """A new random key written to ``path`` (mode 0600; a missing parent is made 0700); replaces
    an older key there atomically."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = secrets.token_urlsafe(KEY_BYTES)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, OWNER_ONLY)
    try:
        os.write(fd, (key + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return ApiKey(path, key)


def read_key_file(path: str | os.PathLike, what: str = API_KEY_FILE_ENV) -> ApiKey:
    """The key in ``path``; :class:`ApiKeyError` naming ``what`` (the setting that named the
    file) when it does not exist, is not a regular file, can be read by group or others, or does
    not hold exactly one key."""
    path = Path(path).expanduser()
    try:
        st = path.stat()
    except OSError as e:
        raise ApiKeyError(f"{what}={str(path)!r}: cannot read the API key file ({e.strerror}); "
                          f"give the path of a file that holds the key of the engines "
                          f"(docs/operate.md, Security)") from e
    if not stat.S_ISREG(st.st_mode):
        raise ApiKeyError(f"{what}={str(path)!r} is not a regular file: give the file that "
                          f"holds the API key")
    if st.st_mode & 0o077:
        raise ApiKeyError(f"{what}={str(path)!r} can be read by other users (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}): run `chmod 600 {path}`")
    key = path.read_text(errors="replace").strip()
    if not KEY_RE.fullmatch(key):
        raise ApiKeyError(f"{what}={str(path)!r} must hold one API key of 16 to 512 characters "
                          f"from A-Z a-z 0-9 . _ ~ + / = - and nothing else (make one with "
                          f"`python -m drpo_megatron.rollout.launch new-key {path}`)")
    return ApiKey(path, key)


def key_from_env(env: dict[str, str] | None = None) -> ApiKey | None:
    """The key named by ``$DRPO_API_KEY_FILE`` (None when the variable is unset or empty)."""
    env = os.environ if env is None else env
    p = env.get(API_KEY_FILE_ENV)
    return read_key_file(p, API_KEY_FILE_ENV) if p else None


def router_key_args(key: ApiKey) -> list[str]:
    """sglang-router 0.3.2 flags that make the key required on ``/workers`` (list, register,
    remove), ``/generate`` and the other calls drpo makes (measured: ``/health``,
    ``/health_generate``, ``/get_server_info`` and ``/v1/models`` still answer without it):
    ``--api-key`` (also what the router sends to its workers) and ``--control-plane-api-keys``
    (the control plane, as an admin key)."""
    # "--flag=value": token_urlsafe keys may begin with "-", which argparse takes for an option
    return [f"--api-key={key.key}",
            f"--control-plane-api-keys={ROUTER_KEY_ID}:drpo-trainer:admin:{key.key}"]
