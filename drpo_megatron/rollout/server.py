"""Launch and talk to a stock SGLang server (``python -m sglang.launch_server``).

Every wait has a timeout and logs what it waits for; a timeout or a dead server raises
:class:`ServerError` naming the server and its log file (with the log's tail), never hangs.

With an :class:`~drpo_megatron.rollout.auth.ApiKey` a server we launch requires it on every
endpoint except ``/health*`` (started through :mod:`drpo_megatron.rollout.launch`: the key is in
no command line and no log), and every request of ours carries it (``Authorization: Bearer``).
A server binds to ``ServerConfig.host`` (loopback by default: ``drpo train`` runs its servers
on its own host).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import requests
from pydantic import Field

from drpo_megatron.dist import free_port
from drpo_megatron.errors import RuntimeFailure
from drpo_megatron.platform import sglang_cpu
from drpo_megatron.rollout.auth import ApiKey
from drpo_megatron.schema import Section

log = logging.getLogger(__name__)

HEALTH_POLL_S = 1.0
LOG_EVERY_S = 10.0  # how often a long wait says what it is waiting for
LOG_TAIL_LINES = 30
# SGLang's graceful SIGTERM path takes ~7-20 s on a loaded CPU machine (a 5 s drain poll, the
# scheduler's ShutdownReq, reaping); only after this long is the process group killed.
STOP_TIMEOUT_S = 60.0


class ServerError(RuntimeFailure):
    """An SGLang server failed, died or timed out; the message names its log file."""


# torch.distributed / torchrun variables of the *trainer* process: an SGLang server that inherits
# them joins the trainer's rendezvous store at start-up (TORCHELASTIC_USE_AGENT_STORE) and hangs
# until its start-up timeout. The server is its own distributed job: it must not see them.
TRAINER_DIST_ENV_PREFIXES = ("TORCHELASTIC_", "ROLE_")
TRAINER_DIST_ENV_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                         "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR",
                         "MASTER_PORT", "TORCH_NCCL_ASYNC_ERROR_HANDLING_AGENT")


def server_base_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The trainer's environment minus its torch.distributed / torchrun variables."""
    env = dict(os.environ if env is None else env)
    for k in list(env):
        if k in TRAINER_DIST_ENV_VARS or k.startswith(TRAINER_DIST_ENV_PREFIXES):
            del env[k]
    return env


def tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "<no log>"
    return "\n".join(lines[-n:])


class ServerConfig(Section):
    """One SGLang server.  ``extra_args`` go verbatim to ``sglang.launch_server``."""

    # the address the servers drpo train launches bind to (and are reached at): loopback, as they
    # run on the trainer's host; never 0.0.0.0 (docs/operate.md, Security)
    host: str = "127.0.0.1"
    """Address the server binds to and we connect to."""
    bind_interface: str | None = None
    """SLURM disaggregated layout (slurm/disaggregated.sbatch.tmpl): the network interface (e.g.
    ib0, eth0) whose IPv4 address the rollout nodes' servers and router bind to; null: the
    node's SLURM NodeAddr, resolved to an address."""
    port: int = Field(default=0, ge=0, le=65535)
    """TCP port; 0 = pick a free port."""
    startup_timeout_s: float = Field(default=300.0, gt=0)
    """Seconds to wait for /health after launch before giving up (naming the log)."""
    request_timeout_s: float = Field(default=300.0, gt=0)
    """Seconds one /generate request may take."""
    weight_update_timeout_s: float = Field(default=300.0, gt=0)
    """Seconds one weight update may take."""
    dtype: Literal["bfloat16", "float16", "float32", "auto"] = "bfloat16"
    """Dtype SGLang loads the weights in (--dtype)."""
    random_seed: int = 0
    """SGLang's --random-seed."""
    extra_args: list[str] = Field(default_factory=list)
    """Extra command-line arguments for sglang.launch_server, verbatim."""


class ManagedProcess:
    """A subprocess with an HTTP ``/health`` endpoint that we launch (log file, own session, so
    a stop takes its children with it) or that somebody else runs (``external``: start and stop
    do nothing).  Subclasses set ``name``, ``url``, ``log_path``, ``external``, ``proc``,
    ``_session`` and give :meth:`command`; failures raise ``error`` naming the log and its tail.
    """

    error: type[ServerError] = ServerError
    name: str
    url: str
    log_path: Path
    external: bool
    proc: subprocess.Popen | None
    _session: requests.Session
    api_key: ApiKey | None = None  # required by the process, sent on every request of ours

    def _use_key(self, api_key: ApiKey | None) -> None:
        self.api_key = api_key
        if api_key is not None:
            self._session.headers.update(api_key.headers())

    def command(self) -> list[str]:
        raise NotImplementedError

    def log_tail(self) -> str:
        return tail(self.log_path)

    def where(self) -> str:
        """Where to look when it fails."""
        if self.external:
            return f"it is run by somebody else ({self.url}): see the log of whoever runs it"
        return f"see {self.log_path}. Last lines:\n{self.log_tail()}"

    def start(self):
        if self.external:
            log.info("%s at %s is run by somebody else: not starting it", self.name, self.url)
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        log.info("starting %s on %s (log: %s)", self.name, self.url, self.log_path)
        with open(self.log_path, "ab") as fh:
            fh.write(("$ " + " ".join(cmd) + "\n").encode())
            fh.flush()
            # the SGLang server and sglang-router (which imports sglang) need the same CPU
            # environment, minus the trainer's torchrun variables
            env = sglang_cpu.server_env(server_base_env())
            if self.api_key is not None:  # the key file's path, read by rollout/launch.py
                env.update(self.api_key.env())
            # tethered: the whole process group dies with this trainer (rollout/tether.py)
            self.proc = subprocess.Popen([sys.executable, "-m", "drpo_megatron.rollout.tether",
                                          str(os.getpid()), *cmd],
                                         stdout=fh, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        return self

    def json_body(self, r: requests.Response, what: str, path: str) -> Any:
        """The JSON of a response, or ``error`` naming the request and the body's start."""
        try:
            return r.json()
        except ValueError as e:
            raise self.error(f"{self.name}: {what} ({path}) returned a body that is not JSON: "
                             f"{r.text[:200]!r}") from e

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise self.error(f"{self.name} exited with code {self.proc.returncode}; see "
                             f"{self.log_path}. Last lines:\n{self.log_tail()}")

    def wait_health(self, timeout_s: float, setting: str) -> None:
        """Until ``/health`` answers 200; raises after ``timeout_s`` naming ``setting`` (the
        config field that sets it) and the log, and logs what it waits for every LOG_EVERY_S."""
        t0 = last_log = time.time()
        while True:
            self.check_alive()
            try:
                if self._session.get(self.url + "/health", timeout=5).status_code == 200:
                    log.info("%s healthy after %.1fs", self.name, time.time() - t0)
                    return
            except requests.RequestException:
                pass
            now = time.time()
            if now - t0 > timeout_s:
                raise self.error(f"{self.name} at {self.url} not healthy after {timeout_s:.0f}s "
                                 f"({setting}); {self.where()}")
            if now - last_log > LOG_EVERY_S:
                log.info("waiting for %s /health at %s (%.0fs of %.0fs; log: %s)", self.name,
                         self.url, now - t0, timeout_s, self.log_path)
                last_log = now
            time.sleep(HEALTH_POLL_S)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Graceful stop: SIGTERM to the launched process only (the tether passes it to SGLang's
        leader, which drains, tells its scheduler(s) to exit, reaps its children and exits 0);
        after ``timeout_s`` SIGKILL to the whole process group (it is its own session).
        Signalling the group first would kill the scheduler under the leader, whose watchdog then
        logs a crash ("Subprocess scheduler_0 crashed with exit code -15 ... SIGQUIT received ...
        one child failed") and SIGKILLs itself: a clean stop would read as a crash in the server
        log.  A process that already died leaves none of its children behind either."""
        if self.external or self.proc is None:
            return
        if self.proc.poll() is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            return
        try:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=timeout_s)
            how = f"exit code {self.proc.returncode}"
        except subprocess.TimeoutExpired:
            how = f"killed after {timeout_s:.0f}s"
        try:  # children left behind (none after a graceful exit) or a stop that timed out
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(timeout=timeout_s)
        log.info("%s stopped (%s)", self.name, how)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class SGLangServer(ManagedProcess):
    """A server subprocess plus a thin HTTP client for the endpoints RL needs.

    With ``url`` the object is a client of a server somebody else runs (e.g. a SLURM job's
    rollout node behind an external router): :meth:`start` and :meth:`stop` do nothing, and
    :meth:`wait_healthy` waits for the server to (re)appear at that URL.
    """

    def __init__(self, model_path: str | os.PathLike, cfg: ServerConfig, log_dir: str | os.PathLike,
                 name: str = "sglang-0", *, url: str | None = None, api_key: ApiKey | None = None):
        self.model_path = str(model_path)
        self.cfg = cfg
        self.name = name
        self.external = url is not None
        if url is not None:
            self.url = url.rstrip("/")
            self.port = int(self.url.rsplit(":", 1)[1]) if self.url.count(":") >= 2 else 80
        else:
            self.port = cfg.port or free_port(cfg.host)
            self.url = f"http://{cfg.host}:{self.port}"
        self.log_path = Path(log_dir) / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self._session = requests.Session()
        self._use_key(api_key)

    @classmethod
    def attach(cls, url: str, cfg: ServerConfig, log_dir: str | os.PathLike, name: str,
               model_path: str | os.PathLike = "", api_key: ApiKey | None = None
               ) -> "SGLangServer":
        """A client of an already running server at ``url`` (no process of ours)."""
        return cls(model_path, cfg, log_dir, name, url=url, api_key=api_key)

    # ------------------------------------------------------------------ lifecycle
    def command(self) -> list[str]:
        # with a key: stock SGLang started through rollout/launch.py, which adds --api-key
        launcher = (["-m", "drpo_megatron.rollout.launch", "sglang"] if self.api_key is not None
                    else ["-m", "sglang.launch_server"])
        return [
            sys.executable, *launcher,
            "--model-path", self.model_path,
            "--host", self.cfg.host, "--port", str(self.port),
            "--dtype", self.cfg.dtype,
            "--random-seed", str(self.cfg.random_seed),
            "--skip-server-warmup",
            *sglang_cpu.server_args(),
            *self.cfg.extra_args,
        ]

    def wait_healthy(self, timeout_s: float | None = None) -> None:
        self.wait_health(timeout_s or self.cfg.startup_timeout_s,
                         "rollout.server.startup_timeout_s")

    # ------------------------------------------------------------------ HTTP
    def _post(self, path: str, payload: dict[str, Any], timeout_s: float, what: str) -> Any:
        self.check_alive()
        try:
            r = self._session.post(self.url + path, json=payload, timeout=timeout_s)
        except requests.Timeout as e:
            raise ServerError(f"{self.name}: {what} ({path}) timed out after {timeout_s:.0f}s; "
                              f"see {self.log_path}") from e
        except requests.ConnectionError as e:
            self.check_alive()
            raise ServerError(f"{self.name}: cannot reach {self.url}{path} for {what}: {e}; "
                              f"see {self.log_path}") from e
        if r.status_code != 200:
            raise ServerError(f"{self.name}: {what} ({path}) returned HTTP {r.status_code}: "
                              f"{r.text[:500]}; see {self.log_path}")
        return self.json_body(r, what, path)

    def generate(self, input_ids: list[list[int]], sampling_params: dict[str, Any], *,
                 return_logprob: bool = True, top_logprobs_num: int = 0,
                 return_routed_experts: bool = False) -> list[dict[str, Any]]:
        """One ``/generate`` call for a batch of prompts; returns SGLang's per-sample outputs.

        With ``sampling_params["n"] = k`` SGLang returns ``len(input_ids) * k`` outputs ordered
        prompt-major (the k samples of prompt 0 first).  ``return_routed_experts``: each output's
        ``meta_info.routed_experts`` (routing replay; the server needs
        --enable-return-routed-experts, see rollout/routes.py).
        """
        payload: dict[str, Any] = {"input_ids": input_ids, "sampling_params": sampling_params,
                                   "return_logprob": return_logprob}
        if return_logprob:
            payload["logprob_start_len"] = -1  # only the generated tokens' log-probs
        if top_logprobs_num:
            payload["top_logprobs_num"] = top_logprobs_num
        if return_routed_experts:
            payload["return_routed_experts"] = True
        out = self._post("/generate", payload, self.cfg.request_timeout_s, "generate")
        return out if isinstance(out, list) else [out]

    def update_weights_from_disk(self, path: str | os.PathLike, weight_version: str) -> dict:
        """Load new weights from an HF checkpoint directory, then flush the prefix cache (KV
        entries computed with the old weights must never be reused)."""
        res = self._post("/update_weights_from_disk",
                         {"model_path": str(path), "weight_version": weight_version,
                          "flush_cache": False, "abort_all_requests": False},
                         self.cfg.weight_update_timeout_s, "update_weights_from_disk")
        if not res.get("success", False):
            raise ServerError(f"{self.name}: update_weights_from_disk({path}) failed: "
                              f"{res.get('message')}; see {self.log_path}")
        self.flush_cache()
        return res

    def flush_cache(self, timeout_s: float | None = None) -> None:
        """``/flush_cache``, retried while SGLang still retires finished requests (it refuses
        to flush with requests running or queued, which briefly includes just-returned ones)."""
        timeout_s = timeout_s or self.cfg.weight_update_timeout_s
        t0 = time.time()
        delay = 0.05
        while True:
            self.check_alive()
            r = self._session.post(self.url + "/flush_cache", timeout=timeout_s)
            if r.status_code == 200:
                return
            if time.time() - t0 > timeout_s:
                raise ServerError(f"{self.name}: /flush_cache still refused after {timeout_s:.0f}s "
                                  f"(HTTP {r.status_code}: {r.text[:200]}); see {self.log_path}")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def set_weight_version(self, version: str) -> None:
        res = self._post("/update_weight_version", {"new_version": version, "abort_all_requests": False},
                         self.cfg.request_timeout_s, "update_weight_version")
        if not res.get("success", False):
            raise ServerError(f"{self.name}: update_weight_version({version}) failed: {res.get('message')}")

    def model_info(self) -> dict:
        self.check_alive()
        r = self._session.get(self.url + "/model_info", timeout=30)
        r.raise_for_status()
        return r.json()

    def weight_version(self) -> str:
        return str(self.model_info().get("weight_version"))

    def server_info(self) -> dict:
        self.check_alive()
        try:
            r = self._session.get(self.url + "/server_info", timeout=30)
            r.raise_for_status()
            return r.json()
        except (requests.RequestException, ValueError) as e:
            raise ServerError(f"{self.name}: /server_info failed: {e}; see {self.log_path}") from e

    def tp_size(self) -> int:
        info = self.server_info()
        return int(info.get("tp_size", 1) or 1)

    # ------------------------------------------------------------------ in-place weight updates
    def _checked(self, path: str, payload: dict[str, Any], what: str,
                 timeout_s: float | None = None) -> dict:
        res = self._post(path, payload, timeout_s or self.cfg.weight_update_timeout_s, what)
        if not isinstance(res, dict) or not res.get("success", False):
            msg = res.get("message") if isinstance(res, dict) else res
            raise ServerError(f"{self.name}: {what} failed: {msg}; see {self.log_path}")
        return res

    def begin_weight_update(self) -> None:
        """Open SGLang's weight-update session (required around tensor/distributed updates)."""
        self._checked("/begin_weight_update", {}, "begin_weight_update")

    def end_weight_update(self) -> None:
        self._checked("/end_weight_update", {}, "end_weight_update")

    def update_weights_from_tensor(self, serialized: list[str], *, load_format: str | None = None,
                                   flush_cache: bool = False) -> dict:
        """``/update_weights_from_tensor``: ``serialized`` holds one base64 string per server TP
        rank, each a ``ForkingPickler`` dump of ``[(hf_name, tensor), ...]``."""
        payload: dict[str, Any] = {"serialized_named_tensors": serialized, "flush_cache": flush_cache,
                                   "abort_all_requests": False}
        if load_format is not None:
            payload["load_format"] = load_format
        return self._checked("/update_weights_from_tensor", payload, "update_weights_from_tensor")

    def init_weights_update_group(self, *, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, group_name: str, backend: str,
                                  timeout_s: float | None = None) -> dict:
        return self._checked("/init_weights_update_group",
                             {"master_address": master_address, "master_port": master_port,
                              "rank_offset": rank_offset, "world_size": world_size,
                              "group_name": group_name, "backend": backend},
                             "init_weights_update_group", timeout_s)

    def destroy_weights_update_group(self, group_name: str) -> None:
        self._checked("/destroy_weights_update_group", {"group_name": group_name},
                      "destroy_weights_update_group")

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str],
                                        shapes: list[list[int]], *, group_name: str,
                                        flush_cache: bool = False) -> dict:
        """Receive one broadcast bucket from rank 0 of the update group (blocks until the trainer
        has broadcast every tensor of the bucket, in this order)."""
        return self._checked("/update_weights_from_distributed",
                             {"names": names, "dtypes": dtypes, "shapes": shapes,
                              "group_name": group_name, "flush_cache": flush_cache,
                              "abort_all_requests": False},
                             "update_weights_from_distributed")

    # ------------------------------------------------------------------ colocated memory
    def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        """``/release_memory_occupation``: give back GPU memory (``tags`` of "weights",
        "kv_cache", "cuda_graph"; None = all).  The server must be idle; with
        ``--enable-memory-saver`` the memory returns to the device (weights' contents are lost:
        push weights after resuming them); without it (and on CPU) SGLang's no-op adapter keeps
        it.  See :mod:`drpo_megatron.rollout.colocate`."""
        self._post("/release_memory_occupation", {} if tags is None else {"tags": list(tags)},
                   self.cfg.weight_update_timeout_s, "release_memory_occupation")

    def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        """``/resume_memory_occupation``: map the released memory again (None = all tags)."""
        self._post("/resume_memory_occupation", {} if tags is None else {"tags": list(tags)},
                   self.cfg.weight_update_timeout_s, "resume_memory_occupation")

    def pause_generation(self, mode: str = "abort") -> None:
        """``/pause_generation``.  ``mode="abort"`` (the one used around weight updates) returns
        every in-flight request at once with ``finish_reason.type == "abort"`` and a partial
        output (the client must re-issue it); requests that arrive while paused wait in the
        server until :meth:`continue_generation`.  ``"retract"`` / ``"in_place"`` keep the
        requests and resume them afterwards, so one response would mix weight versions."""
        if mode not in ("abort", "retract", "in_place"):
            raise ValueError(f"pause_generation mode {mode!r}: choose abort, retract or in_place")
        self._post("/pause_generation", {"mode": mode}, self.cfg.request_timeout_s,
                   "pause_generation")

    def continue_generation(self) -> None:
        self._post("/continue_generation", {}, self.cfg.request_timeout_s, "continue_generation")


def is_aborted(out: Any) -> bool:
    """True when one ``/generate`` output was aborted (``finish_reason.type == "abort"``, e.g. by
    ``/pause_generation`` around a weight update): its tokens are partial."""
    meta = out.get("meta_info") if isinstance(out, dict) else None
    fin = meta.get("finish_reason") if isinstance(meta, dict) else None
    return isinstance(fin, dict) and fin.get("type") == "abort"


def aborted(outs: list[Any]) -> bool:
    """True when any ``/generate`` output was aborted: its tokens are partial and must be
    re-generated (or continued: rollout/partial.py)."""
    return any(is_aborted(o) for o in outs)
