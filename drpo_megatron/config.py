"""Typed run configuration, loaded from YAML with strict validation.

Each component owns a dataclass; :class:`RunConfig` nests them.  Loading rejects unknown keys and
wrong types with one-line errors naming the field, the value and the fix, before any process
starts.  ``RunConfig.to_dict()`` is what a run writes to ``RUN_DIR/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from drpo_megatron.data.math import DEFAULT_PROMPT_TEMPLATE
from drpo_megatron.models.tiny import TinyModelConfig
from drpo_megatron.rollout.server import ServerConfig


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, the value and the fix."""


@dataclass
class ModelConfig:
    # HF checkpoint directory of the initial policy; empty = build the embedded tiny Qwen3-MoE.
    hf_path: str = ""
    # Where the embedded tiny checkpoint is built / reused.
    cache_dir: str = "~/.cache/drpo-megatron"
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    # Training precision of the Megatron policy: fp32 or bf16 (FP8 is a GPU feature).
    dtype: str = "fp32"
    # FP8 training through Transformer Engine (GPU only): "" (off) or "blockwise" (128x128
    # blocks, FP32 scales: NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1, fp8 params off; router,
    # embeddings, LM head and norms stay in model.dtype, which must then be bf16).
    fp8: str = ""
    # MoE load-balancing (aux) loss coefficient added to the policy loss; None = the checkpoint's
    # router_aux_loss_coef. Megatron computes it per micro-batch on each data-parallel rank's
    # tokens, so with it on, the gradient depends (slightly) on the DP layout.
    moe_aux_loss_coeff: float | None = None
    # Architecture numbers for `drpo plan` (HF config.json names). Zeros: read from
    # hf_path/config.json when that directory exists.
    arch: ArchConfig = field(default_factory=lambda: ArchConfig())


@dataclass
class ArchConfig:
    """HF config.json field meanings (Qwen2 / Qwen3 / Qwen3-MoE / Qwen3.5-MoE)."""

    architecture: str = ""
    hidden_size: int = 0
    num_hidden_layers: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    vocab_size: int = 0
    intermediate_size: int = 0
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    tie_word_embeddings: bool = False
    # Qwen3.5 hybrid: every full_attention_interval-th layer is full attention, the others
    # Gated DeltaNet (planned with linear_* head numbers). 1 = every layer full attention.
    full_attention_interval: int = 1
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0


@dataclass
class ParallelConfig:
    """Cluster layout of one run.  The trainer world is ``num_nodes * gpus_per_node`` ranks
    (``dp = world / (tp * pp)``, derived); rollout servers run on ``rollout_nodes`` extra nodes
    (0 = colocated on the trainer nodes)."""

    # "auto": this machine; "cuda": the config targets GPU nodes, so device-dependent checks
    # (CUDA present, hf_path exists, FP8) are deferred to run time on those nodes.
    device: str = "auto"
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None  # expert tensor parallel; None = Megatron's default (tp)
    sequence_parallel: bool | None = None  # None: on when tp > 1
    num_nodes: int = 1
    gpus_per_node: int = 1
    rollout_nodes: int = 0
    rollout_tp: int = 1  # SGLang tensor parallel size of one server
    # sequences per training micro-batch (per DP rank). 64 = the embedded CPU run's whole
    # per-update mini-batch in one micro-batch (CPU matmuls want rows); GPU configs use 1-4.
    micro_batch_size: int = 64
    recompute: str = "none"  # activation recomputation: none | selective | full
    use_distributed_optimizer: bool = True
    gpu_memory_gb: float = 80.0  # per-GPU memory `drpo plan` fits into

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)


@dataclass
class TaskConfig:
    kind: str = "arithmetic"
    # a+b and a-b with operands in [0, max_operand]: 2 * (max_operand + 1)^2 problems in all,
    # split into disjoint RL-train and held-out eval sets.
    num_train: int = 160
    num_eval: int = 40
    max_operand: int = 9
    seed: int = 0
    # kind "math" (the paper's recipe, drpo_megatron/data/math.py): jsonl files {prompt, answer}
    # from tools/prepare_math_data.py (DAPO-Math-17k to train on, AIME 2024/2025 to evaluate:
    # eval/<file stem>/avg@k); paths are checked here, or at run time on the nodes for
    # parallel.device: cuda. The model sees prompt_template ({problem} replaced) in the
    # tokenizer's chat template. Prompts longer than max_prompt_tokens are dropped (0 = no limit).
    train_file: str = ""
    eval_files: list = field(default_factory=list)
    max_prompt_tokens: int = 0
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE


@dataclass
class RolloutConfig:
    prompts_per_step: int = 16
    samples_per_prompt: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    # DAPO dynamic sampling (drpo_megatron/rollout/sampling.py, docs/rollout.md): drop prompt
    # groups whose final rewards are all equal (zero advantage) and keep generating from the next
    # prompts until prompts_per_step groups remain; each round asks for
    # ceil(oversample_factor * groups still missing) prompts (the factor applies only with the
    # filter).  After max_rounds rounds (0 = no limit) on_exhausted decides: "raise" (stop the
    # run with the counts) or "fill" (top up with all-equal groups, logged as filled_groups).
    dynamic_filter: bool = False
    oversample_factor: float = 1.0
    max_rounds: int = 8
    on_exhausted: str = "raise"
    # Responses cut at max_new_tokens (finish_reason "length"): "keep" trains on them as they are;
    # "filter" excludes them from the loss (their reward still enters the group baseline);
    # "penalty" adds DAPO's soft overlong punishment to every response's reward: 0 up to
    # max_new_tokens - overlong_buffer tokens, then linearly down to -overlong_penalty at
    # max_new_tokens.
    overlong: str = "keep"
    overlong_buffer: int = 4
    overlong_penalty: float = 1.0
    weight_transport: str = "disk"
    # Weights the server runs: bf16 | fp8_emulated (CPU stand-in for FP8 rollouts: 128x128
    # blockwise e4m3 quantize-dequantize at every sync) | fp8 (real FP8 checkpoint; GPU servers).
    precision: str = "bf16"
    # tensor / distributed transports: the weights travel in buckets of at most this many MiB
    weight_bucket_mb: float = 512.0
    # After every push, compare a probe prompt's greedy tokens and log-probs from each server with
    # the trainer's own forward; raise on a gap above verify_sync_atol (None: per-precision default,
    # see drpo_megatron.rollout.verify).  On in tests, off by default (one extra forward per sync).
    verify_sync: bool = False
    verify_sync_atol: float | None = None
    # Rollout servers.  With more than one, requests go through a router: "sglang-router"
    # launches sglang-router (log: logs/router.log; policy router_policy) in front of the
    # servers (drpo_megatron.rollout.router); "client" is drpo's own dispatch (one request per
    # prompt group, round-robin: drpo_megatron.rollout.fleet).  Both retry failed requests
    # (max_attempts), restart a dead server, re-sync it to the current weights and only then
    # give it requests again; weight pushes go to every server directly, bracketed by
    # /pause_generation (abort) ... /continue_generation (aborted requests are re-issued).
    num_servers: int = 1
    router: str = "sglang-router"
    router_policy: str = "round_robin"  # sglang-router --policy: round_robin | cache_aware | ...
    # An sglang-router somebody else runs (e.g. slurm/disaggregated.sbatch.tmpl): drpo launches
    # no server, waits (server.startup_timeout_s) until the router lists num_servers healthy
    # workers, pushes weights to each of them and generates through the router.  Precedence:
    # this field when set, else env DRPO_ROUTER_URL (set by the SLURM template), else none.
    router_url: str | None = None
    max_attempts: int = 3  # per request, across servers
    # Colocated servers (drpo_megatron/rollout/colocate.py): on the driver's GPUs, started with
    # SGLang's memory saver, their weights + KV cache released while the trainer trains and
    # resumed around each weight push.  Also on with env DRPO_ROLLOUT_MODE=colocated (exported by
    # slurm/colocated.sbatch.tmpl).  Needs parallel.rollout_nodes: 0, weight_transport tensor|disk.
    colocate: bool = False
    server: ServerConfig = field(default_factory=ServerConfig)


@dataclass
class LossSection:
    """``name`` picks the policy loss from ``drpo_megatron.algorithms.POLICY_LOSSES``; ``params``
    go to that loss's typed config (e.g. ``{delta: 12.5}`` for DRPO)."""

    name: str = "drpo"
    params: dict = field(default_factory=lambda: {"delta": 12.5})
    aggregation: str = "seq-mean-token-sum-norm"
    # Constant horizon H of seq-mean-token-sum-norm (the paper: max response length 8192).
    horizon: int = 16
    advantage: str = "dr_grpo"


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    # Optimizer steps per rollout step: the rollout batch is split into this many mini-batches.
    updates_per_rollout: int = 2
    lr_schedule: str = "constant"  # the paper's recipe; the only schedule implemented


@dataclass
class TrainConfig:
    max_steps: int = 150
    eval_every: int = 25
    eval_samples_per_prompt: int = 8
    seed: int = 1234
    # Megatron checkpoint (model, optimizer, RNG states, data cursor, step) every save_every
    # steps into <output_dir>/checkpoint; 0 = only at the end.
    save_every: int = 0
    # "auto": continue from <output_dir>/checkpoint when it exists (`drpo train --resume` makes
    # a missing checkpoint an error: "must"); "never": always start at step 1.
    resume: str = "auto"
    # Per-sample SGLang sampling seeds derived from (seed, step, prompt, sample): a sample
    # depends only on its seed and the weights, not on what the server did before, so a resumed
    # run draws the samples the uninterrupted run drew (docs/parallelism.md).  SGLang honours
    # seeds only in deterministic mode: on GPU the servers get --enable-deterministic-inference
    # (batch-invariant kernels, slower rollouts); on CPU drpo's platform layer enables SGLang's
    # seeded sampler (drpo_megatron/platform/sglang_cpu.py).  false = SGLang's own RNG.
    seeded_rollouts: bool = True


@dataclass
class LoggingConfig:
    writers: list = field(default_factory=lambda: ["jsonl", "tensorboard"])


@dataclass
class RunConfig:
    name: str = "embedded-cpu-drpo"
    output_dir: str = "runs/embedded-cpu-drpo"
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------- loading
def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(path: str, value: Any, tp) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {_type_name(tp)} fields, got "
                              f"{value!r}; write it as a YAML mapping")
        return _build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
        return _coerce(path, value, tp)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r}: expected a number; write e.g. {path.split('.')[-1]}: 1.0")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}={value!r}: expected an integer; write e.g. "
                              f"{path.split('.')[-1]}: 1")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r}: expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r}: expected a string")
        return value
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}={value!r}: expected a list")
        return list(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}={value!r}: expected a mapping")
        return dict(value)
    return value


def _build(cls, data: dict[str, Any], prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}; valid keys here: {sorted(names)}")
        kwargs[key] = _coerce(path, value, hints[key])
    return cls(**kwargs)


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "params":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults <- YAML file <- overrides (nested dicts), validated."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {str(path)!r}: file not found; pass a YAML file such as "
                              f"model_configs/tiny_qwen3_moe_cpu.yaml")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {str(path)!r}: not valid YAML ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"--config {str(path)!r}: top level must be a mapping, got {type(data).__name__}")
    if overrides:
        data = _merge(data, overrides)
    cfg = _build(RunConfig, data)
    validate(cfg)
    return cfg


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def validate(cfg: RunConfig) -> None:
    """Semantic checks that do not need any process to start."""
    def positive(path: str, value, kind=int):
        if value <= 0:
            raise ConfigError(f"{path}={value!r} must be > 0")

    r, o, t, l = cfg.rollout, cfg.optim, cfg.train, cfg.loss
    positive("rollout.prompts_per_step", r.prompts_per_step)
    positive("rollout.max_new_tokens", r.max_new_tokens)
    from drpo_megatron.rollout.sampling import check_sampling_config

    try:
        check_sampling_config(r)  # dynamic_filter / oversample / overlong fields
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if r.samples_per_prompt < 2:
        raise ConfigError(f"rollout.samples_per_prompt={r.samples_per_prompt} must be >= 2: group "
                          "advantages need at least two samples per prompt")
    if r.temperature <= 0:
        raise ConfigError(f"rollout.temperature={r.temperature} must be > 0 (log-probs are computed "
                          "from logits / temperature; greedy rollouts are not supported for RL)")
    if not 0 < r.top_p <= 1:
        raise ConfigError(f"rollout.top_p={r.top_p} must be in (0, 1]")
    positive("train.max_steps", t.max_steps)
    if t.save_every < 0:
        raise ConfigError(f"train.save_every={t.save_every} must be >= 0 (0 = save at the end only)")
    if t.resume not in ("auto", "never", "must"):
        raise ConfigError(f"train.resume={t.resume!r}: choose 'auto', 'never' or 'must'")
    positive("optim.lr", o.lr)
    positive("optim.updates_per_rollout", o.updates_per_rollout)
    if r.prompts_per_step % o.updates_per_rollout:
        raise ConfigError(
            f"optim.updates_per_rollout={o.updates_per_rollout} must divide rollout.prompts_per_step="
            f"{r.prompts_per_step} (mini-batches hold whole prompt groups)")
    if cfg.model.dtype not in ("fp32", "bf16"):
        raise ConfigError(f"model.dtype={cfg.model.dtype!r}: choose 'fp32' or 'bf16' (FP8 training "
                          "is set in the GPU model configs and needs Transformer Engine)")
    validate_parallel(cfg)
    from drpo_megatron.rollout.colocate import ColocationError, check_config

    try:
        check_config(cfg)  # rollout.colocate / DRPO_ROLLOUT_MODE against the layout
    except ColocationError as e:
        raise ConfigError(str(e)) from None
    gpu_target = cfg.parallel.device == "cuda"
    if cfg.model.hf_path and not gpu_target and not Path(cfg.model.hf_path).expanduser().is_dir():
        raise ConfigError(f"model.hf_path={cfg.model.hf_path!r}: directory not found; point it at an "
                          "HF checkpoint or leave it empty for the embedded tiny policy")
    total = 2 * (cfg.task.max_operand + 1) ** 2
    if cfg.task.num_train + cfg.task.num_eval > total:
        raise ConfigError(
            f"task.num_train + task.num_eval = {cfg.task.num_train + cfg.task.num_eval} exceeds the "
            f"{total} distinct problems with task.max_operand={cfg.task.max_operand}; lower them "
            "or raise max_operand")
    if cfg.task.kind == "math":
        from drpo_megatron.data.math import DataError, check_template

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
    elif cfg.task.kind != "arithmetic":
        raise ConfigError(f"task.kind={cfg.task.kind!r}: choose 'arithmetic' (built in) or 'math' "
                          "(jsonl from tools/prepare_math_data.py, GPU configs)")
    if cfg.task.max_prompt_tokens < 0:
        raise ConfigError(f"task.max_prompt_tokens={cfg.task.max_prompt_tokens} must be >= 0 (0 = no limit)")
    if cfg.optim.lr_schedule != "constant":
        raise ConfigError(f"optim.lr_schedule={cfg.optim.lr_schedule!r}: only 'constant' is "
                          "implemented (the paper's recipe); set optim.lr_schedule: constant")
    from drpo_megatron.algorithms import AGGREGATION_MODES, ADVANTAGE_ESTIMATORS, make_loss_config

    try:
        make_loss_config(l.name, l.params)
    except ValueError as e:
        raise ConfigError(f"loss: {e}") from e
    if l.aggregation not in AGGREGATION_MODES:
        raise ConfigError(f"loss.aggregation={l.aggregation!r}: choose one of {list(AGGREGATION_MODES)}")
    if l.advantage not in ADVANTAGE_ESTIMATORS:
        raise ConfigError(f"loss.advantage={l.advantage!r}: choose one of {sorted(ADVANTAGE_ESTIMATORS)}")
    from drpo_megatron.weights.transport import WEIGHT_TRANSPORTS

    if r.weight_transport not in WEIGHT_TRANSPORTS:
        raise ConfigError(f"rollout.weight_transport={r.weight_transport!r}: choose one of "
                          f"{sorted(WEIGHT_TRANSPORTS)}")
    from drpo_megatron.weights.hf_export import ROLLOUT_PRECISIONS

    if r.precision not in ROLLOUT_PRECISIONS:
        raise ConfigError(f"rollout.precision={r.precision!r}: choose one of {list(ROLLOUT_PRECISIONS)}")
    positive("rollout.weight_bucket_mb", r.weight_bucket_mb, float)
    positive("rollout.num_servers", r.num_servers)
    positive("rollout.max_attempts", r.max_attempts)
    if r.router not in ("sglang-router", "client"):
        raise ConfigError(f"rollout.router={r.router!r}: choose 'sglang-router' or 'client'")
    if r.router_policy not in ("round_robin", "cache_aware", "power_of_two", "random"):
        raise ConfigError(f"rollout.router_policy={r.router_policy!r}: choose round_robin, "
                          "cache_aware, power_of_two or random")
    if r.router_url and r.router == "client":
        raise ConfigError(f"rollout.router_url={r.router_url!r} with rollout.router='client': an "
                          "external router needs rollout.router: sglang-router")
    if r.verify_sync_atol is not None and r.verify_sync_atol <= 0:
        raise ConfigError(f"rollout.verify_sync_atol={r.verify_sync_atol} must be > 0 (or null for "
                          "the per-precision default)")
    if r.precision == "fp8" and not gpu_target and not torch_cuda_available():
        raise ConfigError("rollout.precision='fp8' needs SGLang's FP8 kernels (a CUDA GPU); on CPU "
                          "use 'fp8_emulated', which carries the same weight error")
    from drpo_megatron.mismatch.writers import WRITERS

    for w in cfg.logging.writers:
        if w not in WRITERS:
            raise ConfigError(f"logging.writers: {w!r} is not a writer; choose from {sorted(WRITERS)}")
    positive("loss.horizon", l.horizon)
    if l.aggregation == "seq-mean-token-sum-norm" and l.horizon < r.max_new_tokens:
        raise ConfigError(
            f"loss.horizon={l.horizon} is below rollout.max_new_tokens={r.max_new_tokens}: the "
            "constant horizon must be at least the longest response")


RECOMPUTE_MODES = ("none", "selective", "full")
FP8_TRAINING_MODES = ("", "blockwise")


def validate_parallel(cfg: RunConfig) -> None:
    """Layout and FP8-training checks that need no process (``drpo plan`` adds the
    architecture-dependent ones: heads by TP, experts by EP, layers by PP, memory)."""
    par = cfg.parallel
    if par.device not in ("auto", "cuda"):
        raise ConfigError(f"parallel.device={par.device!r}: choose 'auto' (this machine) or 'cuda' "
                          "(a GPU-cluster config; device checks deferred to run time)")
    for name in ("tp", "pp", "ep", "num_nodes", "gpus_per_node", "rollout_tp", "micro_batch_size"):
        v = getattr(par, name)
        if v < 1:
            raise ConfigError(f"parallel.{name}={v} must be >= 1")
    if par.etp is not None and par.etp < 1:
        raise ConfigError(f"parallel.etp={par.etp} must be >= 1 (or null for the default, tp)")
    if par.rollout_nodes < 0:
        raise ConfigError(f"parallel.rollout_nodes={par.rollout_nodes} must be >= 0 (0 = rollout "
                          "servers colocated on the trainer nodes)")
    if par.gpu_memory_gb <= 0:
        raise ConfigError(f"parallel.gpu_memory_gb={par.gpu_memory_gb} must be > 0 (e.g. 80 for H100)")
    if par.recompute not in RECOMPUTE_MODES:
        raise ConfigError(f"parallel.recompute={par.recompute!r}: choose one of {list(RECOMPUTE_MODES)}")
    world = par.world_size
    if world % (par.tp * par.pp):
        raise ConfigError(
            f"parallel.tp={par.tp}, parallel.pp={par.pp}: world size num_nodes*gpus_per_node={world} "
            f"is not divisible by tp*pp={par.tp * par.pp}; change tp/pp or the node count")
    etp = par.tp if par.etp is None else par.etp
    if world % (par.pp * par.ep * etp):
        raise ConfigError(
            f"parallel.ep={par.ep}: world size {world} is not divisible by pp*ep*etp="
            f"{par.pp * par.ep * etp}; use an ep (or etp) that divides it, or add nodes")
    if par.sequence_parallel and par.tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1; set it to null or false")
    if cfg.model.fp8 not in FP8_TRAINING_MODES:
        raise ConfigError(f"model.fp8={cfg.model.fp8!r}: choose '' (off) or 'blockwise' (TE "
                          "128x128 blockwise FP8 training)")
    if cfg.model.fp8:
        if cfg.model.dtype != "bf16":
            raise ConfigError(f"model.fp8={cfg.model.fp8!r} with model.dtype={cfg.model.dtype!r}: "
                              "FP8 training keeps bf16 weights; set model.dtype: bf16")
        if par.device != "cuda" and not torch_cuda_available():
            raise ConfigError(f"model.fp8={cfg.model.fp8!r} needs Transformer Engine on a CUDA GPU; "
                              "set parallel.device: cuda for a cluster config or model.fp8: ''")
