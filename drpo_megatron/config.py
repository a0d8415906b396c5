"""The run-config tree: one typed section per component, loaded from YAML with strict validation.

Each component owns its section next to its code (``models/config.py``: model + parallel layout,
``algorithms/config.py``: loss, ``training/config.py``: optimizer + the actor's derived config,
``data/config.py``: task, ``rollout/server.py``: one SGLang server); this module adds the
sections that span components (``rollout``, ``train``, ``logging``) and assembles
:class:`RunConfig`.  Loading refuses unknown keys, wrong types, non-finite numbers, duplicate
YAML keys and out-of-range values with one line per problem naming the field, the value and the
fix, before any process starts.  ``RunConfig.to_dict()`` is what a run writes to
``RUN_DIR/config.yaml``; ``drpo config show`` prints every field with its value, default and doc.

Precedence: defaults <- ``--config`` YAML <- command-line overrides (``--set a.b=c``, repeatable,
values parsed as YAML and validated like the file).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from drpo_megatron.algorithms.config import LossSection
from drpo_megatron.data.config import TaskConfig
from drpo_megatron.data.math import DataError, check_template
from drpo_megatron.mismatch.writers import WriterName
from drpo_megatron.models.config import ArchConfig, ModelConfig, ParallelConfig
from drpo_megatron.models.tiny import VOCAB_SIZE
from drpo_megatron.rewards.config import (RewardConfig, RewardConfigError, check_reward_config,
                                          resolve_reward_paths)
from drpo_megatron.rollout.async_rollout import RolloutMode, StalePolicy
from drpo_megatron.rollout.auth import ApiKeyError, read_key_file
from drpo_megatron.rollout.colocate import ColocationError
from drpo_megatron.rollout.colocate import check_config as check_colocation
from drpo_megatron.rollout.colocate import requested as colocated_requested
from drpo_megatron.rollout.router import RouterKind, RouterPolicy
from drpo_megatron.rollout.routes import check_routing_replay_front
from drpo_megatron.rollout.sampling import OnExhausted, OverlongMode
from drpo_megatron.rollout.server import ServerConfig
from drpo_megatron.schema import ConfigError, Section, build_section, load_yaml
from drpo_megatron.training.config import ActorConfig, OptimConfig
from drpo_megatron.training.routing_replay import RoutingReplayMode
from drpo_megatron.weights.hf_export import RolloutPrecision
from drpo_megatron.weights.transport import WeightTransportName

__all__ = ["ActorConfig", "ArchConfig", "ConfigError", "LoggingConfig", "LossSection",
           "ModelConfig", "OptimConfig", "ParallelConfig", "RolloutConfig", "RunConfig",
           "ServerConfig", "TaskConfig", "TrainConfig", "actor_config", "apply_sets",
           "describe_fields", "load_config", "validate"]


class RolloutConfig(Section):
    """Sampling, rewards shaping and the rollout servers (SGLang) with their weight sync."""

    prompts_per_step: int = Field(default=16, gt=0)
    """Prompt groups trained on per step."""
    samples_per_prompt: int = Field(default=8, ge=2)
    """Samples per prompt (a group); group advantages need at least two."""
    temperature: float = Field(default=1.0, gt=0)
    """Sampling temperature; π is computed from logits / temperature like µ (greedy rollouts
    are not supported for RL)."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling threshold in (0, 1]."""
    max_new_tokens: int = Field(default=16, gt=0)
    """Longest response."""
    dynamic_filter: bool = False
    """DAPO dynamic sampling (rollout/sampling.py, docs/rollout.md): drop prompt groups whose
    final rewards are all equal (zero advantage) and keep generating from the next prompts until
    prompts_per_step groups remain."""
    oversample_factor: float = Field(default=1.0, ge=1)
    """Each dynamic-sampling round asks for ceil(oversample_factor * groups still missing)
    prompts (applies only with the filter)."""
    max_rounds: int = Field(default=8, ge=0)
    """Dynamic-sampling rounds before on_exhausted decides (0 = no limit)."""
    on_exhausted: OnExhausted = "raise"
    """After max_rounds: "raise" (stop the run with the counts) or "fill" (top up with
    all-equal groups, logged as filled_groups)."""
    overlong: OverlongMode = "keep"
    """Responses cut at max_new_tokens: "keep" trains on them as they are; "filter" excludes them
    from the loss (their reward still enters the group baseline); "penalty" adds DAPO's soft
    overlong punishment to every response's reward."""
    overlong_buffer: int = 4
    """penalty: 0 up to max_new_tokens - overlong_buffer tokens, then linearly down."""
    overlong_penalty: float = 1.0
    """penalty: the reward change at max_new_tokens is -overlong_penalty."""
    weight_transport: WeightTransportName = "disk"
    """How weights reach the servers: disk (HF export + update_weights_from_disk), tensor (same
    host), distributed (a broadcast group: NCCL on GPU, gloo on CPU)."""
    precision: RolloutPrecision = "bf16"
    """Weights the server runs: bf16 | fp8_emulated (CPU stand-in for FP8 rollouts: 128x128
    blockwise e4m3 quantize-dequantize at every sync) | fp8 (real FP8 checkpoint; GPU servers)."""
    weight_bucket_mb: float = Field(default=512.0, gt=0)
    """tensor / distributed transports: the weights travel in buckets of at most this many MiB."""
    verify_sync: bool = False
    """After every push, compare a probe prompt's greedy tokens and log-probs from each server
    with the trainer's own forward; raise on a gap above verify_sync_atol. On in tests, off by
    default (one extra forward per sync); always done once after a resume."""
    verify_sync_atol: float | None = Field(default=None, gt=0)
    """Largest allowed probe log-prob gap; null = the per-precision default (rollout/verify.py)."""
    num_servers: int = Field(default=1, gt=0)
    """Rollout servers. With more than one, requests go through a router (rollout.router)."""
    router: RouterKind = "sglang-router"
    """With several servers: "sglang-router" launches sglang-router in front of them (log:
    logs/router.log); "client" is drpo's own dispatch (one request per prompt group,
    round-robin). Both retry failed requests, restart a dead server, re-sync it to the current
    weights and only then give it requests again."""
    router_policy: RouterPolicy = "round_robin"
    """sglang-router --policy."""
    router_url: str | None = None
    """An sglang-router somebody else runs (e.g. slurm/disaggregated.sbatch.tmpl): drpo launches
    no server, waits until the router lists num_servers healthy workers, pushes weights to each
    of them and generates through the router. Precedence: this field when set, else env
    DRPO_ROUTER_URL (set by the SLURM template), else none."""
    api_key_file: str | None = None
    """The 0600 file holding the API key of engines somebody else runs (router_url): sent as
    "Authorization: Bearer" on every request (rollout/auth.py, docs/operate.md Security).
    Precedence: this field, else env DRPO_API_KEY_FILE; servers drpo launches itself get a new
    per-run key in <output_dir>/secrets/api_key when neither is set."""
    max_attempts: int = Field(default=3, gt=0)
    """Attempts per request, across servers."""
    colocate: bool = False
    """Colocated servers (rollout/colocate.py): on the driver's GPUs, started with SGLang's memory
    saver, their weights + KV cache released while the trainer trains and resumed around each
    weight push. Also on with env DRPO_ROLLOUT_MODE=colocated (exported by
    slurm/colocated.sbatch.tmpl). Needs parallel.rollout_nodes: 0, weight_transport tensor|disk."""
    routing_replay: RoutingReplayMode = "off"
    """MoE routing replay (R3, docs/rollout.md): "off"; "record" (the servers return each token's
    routed experts; the trainer's own routing is compared with them in mismatch/moe/*, per layer;
    nothing forced); "replay" (every forward of the step, π_old and each update included, routes
    every prompt and response token through the engine's experts; gate scores are gathered at
    those experts, so the router keeps its gradient). Recommended "replay" for MoE policies,
    "off" for dense ones; needs one server or rollout.router: client (sglang-router 0.3.2 drops
    the routes)."""
    mode: RolloutMode = "sync"
    """"sync": each step generates, then trains, then pushes the weights. "async": a producer
    thread keeps the servers generating the next steps' batches while the trainer trains; pushes
    happen between training steps (rollout/async_rollout.py, docs/rollout.md)."""
    max_staleness: int = Field(default=1, ge=0)
    """async: a sample generated by weight version v is trained on at step s only if
    s - 1 - v <= max_staleness (the producer runs at most max_staleness + 1 batches ahead); 0 is
    the synchronous schedule. Batches over the bound (restored from a checkpoint written with a
    larger bound) follow stale_policy."""
    stale_policy: StalePolicy = "drop"
    """A prompt group older than max_staleness: "drop" it (counted in
    rollout/stale_dropped_groups) or "regenerate" it on the current weights."""
    partial_rollouts: bool = False
    """async: a response cut by a weight push continues on the new weights instead of being
    generated again; each token records the version that sampled it and µ is its log-prob under
    that version (rollout/partial.py)."""
    server: ServerConfig = Field(default_factory=ServerConfig)
    """Each SGLang server's launch settings."""

    @model_validator(mode="after")
    def _sampling(self) -> "RolloutConfig":
        if self.overlong == "penalty":
            if not 1 <= self.overlong_buffer <= self.max_new_tokens:
                raise ValueError(f"rollout.overlong_buffer={self.overlong_buffer} must be in [1, "
                                 f"rollout.max_new_tokens={self.max_new_tokens}] for overlong: "
                                 "penalty")
            if self.overlong_penalty < 0:
                raise ValueError(f"rollout.overlong_penalty={self.overlong_penalty} must be >= 0 "
                                 "(the reward at max_new_tokens is -overlong_penalty)")
        if self.router_url and self.router == "client":
            raise ValueError(f"rollout.router_url={self.router_url!r} with rollout.router='client':"
                             " an external router needs rollout.router: sglang-router")
        check_routing_replay_front(self.routing_replay, num_servers=self.num_servers,
                                   router=self.router, router_url=self.router_url,
                                   router_url_from="rollout.router_url")
        if self.partial_rollouts and self.mode != "async":
            raise ValueError("rollout.partial_rollouts=true needs rollout.mode: async (in sync mode "
                             "no push happens while responses are generated); set mode: async or "
                             "partial_rollouts: false")
        return self


class TrainConfig(Section):
    """The loop: steps, evaluation, checkpoints, seeds."""

    max_steps: int = Field(default=150, gt=0)
    """RL steps to run."""
    eval_every: int = Field(default=25, ge=0)
    """Evaluate on the held-out set every this many steps (and before training); 0 = never."""
    eval_samples_per_prompt: int = Field(default=8, gt=0)
    """k of avg@k evaluation."""
    seed: int = 1234
    """Seed of everything: model init order, data order, sampling seeds."""
    save_every: int = Field(default=50, ge=0)
    """Megatron checkpoint (model, optimizer, RNG states, data cursor, step, resolved config)
    every save_every steps into <output_dir>/checkpoint (and always after the last step and on a
    stop request); 0 = only then. A crash loses at most save_every steps."""
    max_nonfinite_updates: int = Field(default=3, ge=0)
    """Optimizer updates in a row whose loss or gradient is NaN/inf that are skipped (counted in
    loss/nonfinite_skipped; the weights never see them) before the run stops with a clear error
    (the last checkpoint stays intact); 0 = stop at the first."""
    resume: Literal["auto", "never", "must"] = "auto"
    """"auto": continue from <output_dir>/checkpoint when it exists; "must" (`drpo train
    --resume`): a missing checkpoint is an error; "never": always start at step 1."""
    seeded_rollouts: bool = True
    """Per-sample SGLang sampling seeds derived from (seed, step, prompt, sample): a sample
    depends only on its seed and the weights, so a resumed run draws the samples the
    uninterrupted run drew. On GPU the servers get --enable-deterministic-inference (slower
    rollouts); on CPU drpo's platform layer enables SGLang's seeded sampler. false = SGLang's
    own RNG."""


class LoggingConfig(Section):
    """Where metrics go (every run also writes config.yaml, metrics.jsonl and rollouts.jsonl)."""

    writers: list[WriterName] = Field(default_factory=lambda: ["jsonl", "tensorboard"])
    """Metric writers: jsonl, tensorboard (alias tb), wandb (offline by default)."""


class RunConfig(Section):
    """One RL run."""

    name: str = "embedded-cpu-drpo"
    """Run name (logs, SLURM job name)."""
    output_dir: str = "runs/embedded-cpu-drpo"
    """The run directory: config.yaml, metrics.jsonl, rollouts.jsonl, logs/, checkpoint/."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The initial policy."""
    task: TaskConfig = Field(default_factory=TaskConfig)
    """Training and held-out problems."""
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    """Sampling and rollout servers."""
    loss: LossSection = Field(default_factory=LossSection)
    """Policy loss, its parameters, aggregation and advantages, reference KL, correction."""
    reward: RewardConfig = Field(default_factory=RewardConfig)
    """What scores a response: math-verify, your function, or a reward server (docs/rewards.md)."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizer."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """The loop."""
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    """Metric writers."""
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    """Cluster layout."""

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("output_dir='': empty; give the run directory, e.g. "
                             "--output-dir runs/my-run")
        return v

    @model_validator(mode="before")
    @classmethod
    def _loss_params_follow_name(cls, data: Any) -> Any:
        # the default params ({delta: 12.5}) are DRPO's: another loss without params gets its own
        # defaults instead of an "unknown key delta" error
        if isinstance(data, dict) and isinstance(data.get("loss"), dict):
            loss = data["loss"]
            if "params" not in loss and loss.get("name", "drpo") != "drpo":
                data = {**data, "loss": {**loss, "params": {}}}
        return data


# ---------------------------------------------------------------------------- loading
def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "params":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_set(item: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> (["a", "b", "c"], value parsed as YAML: numbers, booleans, null,
    lists); the value is validated with the rest of the config."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. "
                          "--set optim.lr=1e-5")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except Exception as e:  # noqa: BLE001 - a YAML error of one value
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({e})") from None
    return [k.strip() for k in key.split(".")], value


def apply_sets(data: dict, sets: list[str]) -> dict:
    """``data`` with each ``--set a.b=c`` applied (deep copy)."""
    data = copy.deepcopy(data)
    for item in sets:
        keys, value = parse_set(item)
        node = data
        for i, k in enumerate(keys[:-1]):
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(keys[:i + 1])} is not a section")
            node = nxt
        node[keys[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A run-config YAML file as a mapping (duplicate keys refused, YAML 1.2 numbers)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {str(path)!r}: file not found; pass a YAML file such as "
                          f"model_configs/tiny_qwen3_moe_cpu.yaml")
    try:
        data = load_yaml(p.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"--config {str(path)!r}: not a UTF-8 text file") from None
    except Exception as e:  # noqa: BLE001 - yaml's scanner/parser/constructor errors
        raise ConfigError(f"--config {str(path)!r}: not valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {str(path)!r}: top level must be a mapping, got "
                          f"{type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                sets: list[str] | None = None) -> RunConfig:
    """Defaults <- YAML file <- ``overrides`` (nested dicts) <- ``sets`` (``a.b=c``), validated."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    if overrides:
        data = _merge(data, overrides)
    if sets:
        data = apply_sets(data, sets)
    cfg = build_section(RunConfig, data)
    # reward.function "file.py:fn" is relative to the config file: made absolute here, so the
    # run's resolved config.yaml still points at it
    resolve_reward_paths(cfg.reward, Path(path).expanduser().resolve().parent if path else None)
    validate(cfg)
    return cfg


def torch_cuda_available() -> bool:
    import torch  # heavy: only for the device-dependent checks

    return torch.cuda.is_available()


def validate(cfg: RunConfig) -> None:
    """Checks across sections and of the machine (files, devices), after the per-field ones."""
    r, o, t, lo = cfg.rollout, cfg.optim, cfg.train, cfg.loss
    try:
        check_reward_config(cfg.reward)  # reward.kind function: it imports, its signature fits
    except RewardConfigError as e:
        raise ConfigError(str(e)) from None
    if r.prompts_per_step % o.updates_per_rollout:
        raise ConfigError(
            f"optim.updates_per_rollout={o.updates_per_rollout} must divide rollout.prompts_per_step="
            f"{r.prompts_per_step} (mini-batches hold whole prompt groups)")
    validate_parallel(cfg)
    try:
        check_colocation(cfg)  # rollout.colocate / DRPO_ROLLOUT_MODE against the layout
    except ColocationError as e:
        raise ConfigError(str(e)) from None
    if r.mode == "async" and colocated_requested(cfg)[0]:
        raise ConfigError(f"rollout.mode=async with {colocated_requested(cfg)[1]}: colocated servers "
                          "release the GPUs while the trainer trains, so nothing can generate "
                          "meanwhile; use rollout.mode: sync, or separate rollout GPUs")
    gpu_target = cfg.parallel.device == "cuda"
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={cfg.output_dir!r} is a file, not a directory; choose "
                          "another --output-dir")
    if cfg.model.hf_path and not gpu_target and not Path(cfg.model.hf_path).expanduser().is_dir():
        raise ConfigError(f"model.hf_path={cfg.model.hf_path!r}: directory not found; point it at an "
                          "HF checkpoint or leave it empty for the embedded tiny policy")
    if cfg.task.kind == "arithmetic":
        total = 2 * (cfg.task.max_operand + 1) ** 2
        if cfg.task.num_train + cfg.task.num_eval > total:
            raise ConfigError(
                f"task.num_train + task.num_eval = {cfg.task.num_train + cfg.task.num_eval} exceeds "
                f"the {total} distinct problems with task.max_operand={cfg.task.max_operand}; lower "
                "them or raise max_operand")
    if cfg.task.kind == "math":
        if not cfg.task.train_file:
            raise ConfigError("task.train_file='': task.kind='math' needs a jsonl {prompt, answer} "
                              "file; make one with tools/prepare_math_data.py")
        if not cfg.task.eval_files:
            raise ConfigError("task.eval_files=[]: task.kind='math' evaluates on held-out jsonl "
                              "files; add them (e.g. AIME 2024/2025 made with "
                              "tools/prepare_math_data.py)")
        try:
            check_template(cfg.task.prompt_template)
        except DataError as e:
            raise ConfigError(str(e)) from None
        for name, path in [("train_file", cfg.task.train_file),
                           *(("eval_files", f) for f in cfg.task.eval_files)]:
            if not gpu_target and not Path(str(path)).expanduser().is_file():
                raise ConfigError(f"task.{name}: {str(path)!r} not found; make it with "
                                  "tools/prepare_math_data.py (cluster configs with parallel.device: "
                                  "cuda check it on the nodes)")
    if r.api_key_file is not None and not gpu_target:  # on a cluster: checked where it runs
        try:
            read_key_file(r.api_key_file, "rollout.api_key_file")
        except ApiKeyError as e:
            raise ConfigError(str(e)) from None
    if r.precision == "fp8" and not gpu_target and not torch_cuda_available():
        raise ConfigError("rollout.precision='fp8' needs SGLang's FP8 kernels (a CUDA GPU); on CPU "
                          "use 'fp8_emulated', which carries the same weight error")
    if lo.aggregation == "seq-mean-token-sum-norm" and lo.horizon < r.max_new_tokens:
        raise ConfigError(
            f"loss.horizon={lo.horizon} is below rollout.max_new_tokens={r.max_new_tokens}: the "
            "constant horizon must be at least the longest response")
    top_k = getattr(lo.policy, "top_k", None)
    if top_k is not None and not cfg.model.hf_path:
        if top_k > VOCAB_SIZE:
            raise ConfigError(f"loss.params.top_k={top_k} exceeds the vocabulary ({VOCAB_SIZE} "
                              "tokens): SGLang's scheduler dies on it; lower top_k")
    del t


def validate_parallel(cfg: RunConfig) -> None:
    """Layout and FP8-training checks that need no process (``drpo plan`` adds the
    architecture-dependent ones: heads by TP, experts by EP, layers by PP, memory)."""
    cfg.parallel.check()
    if cfg.model.fp8:
        if cfg.model.dtype != "bf16":
            raise ConfigError(f"model.fp8={cfg.model.fp8!r} with model.dtype={cfg.model.dtype!r}: "
                              "FP8 training keeps bf16 weights; set model.dtype: bf16")
        if cfg.parallel.device != "cuda" and not torch_cuda_available():
            raise ConfigError(f"model.fp8={cfg.model.fp8!r} needs Transformer Engine on a CUDA GPU; "
                              "set parallel.device: cuda for a cluster config or model.fp8: ''")


def check_world_size(cfg: RunConfig) -> None:
    """The processes this run was launched with must be the layout's world
    (``parallel.num_nodes * parallel.gpus_per_node``), checked before anything starts."""
    par = cfg.parallel
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != par.world_size:
        raise ConfigError(
            f"parallel.num_nodes*gpus_per_node={par.world_size} (tp={par.tp}, pp={par.pp}, "
            f"ep={par.ep}) but this run has WORLD_SIZE={launched} processes; launch it with "
            f"`torchrun --nproc-per-node {par.gpus_per_node} -m drpo_megatron.cli train ...` on "
            f"{par.num_nodes} node(s), or set parallel.gpus_per_node: {launched}")


def actor_config(cfg: RunConfig, policy: str | Path) -> ActorConfig:
    """The actor's config: the run config's own sections, the resolved policy checkpoint, the
    rollout temperature and the seed."""
    return ActorConfig(hf_path=str(policy), model=cfg.model, parallel=cfg.parallel,
                       optim=cfg.optim, loss=cfg.loss, temperature=cfg.rollout.temperature,
                       seed=cfg.train.seed, routing_replay=cfg.rollout.routing_replay)


# ---------------------------------------------------------------------------- introspection
def describe_fields(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, Any, Any, str]]:
    """``(dotted name, value, default, doc)`` of every leaf field of ``model``, depth first."""
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        path = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            yield from describe_fields(value, prefix=f"{path}.")
            continue
        default = field.get_default(call_default_factory=True)
        yield path, value, default, " ".join((field.description or "").split())
