"""The study spec: a grid of ordinary ``drpo train`` runs (docs/study.md).

A study is a base run config, a list of methods (a policy loss with its params, optionally more
config overrides), a list of conditions (config overrides, e.g. ``rollout.precision``) and a
list of seeds.  Every condition x method x seed is one run, whose config is, merged in this
order (later wins; nested mappings merge key by key, ``loss.params`` is replaced whole as in
run configs):

1. the embedded default (:class:`drpo_megatron.config.RunConfig`),
2. ``base.config`` (a run config YAML; relative paths are relative to the spec file),
3. ``base.overrides``,
4. the condition's ``overrides``,
5. the method's ``loss`` section (its ``params`` replace the base's; none given = ``{}``) and
   its ``overrides``,
6. ``name: <condition>/<method>/seed<seed>``, ``output_dir: DIR/runs/<condition>/<method>/seed<seed>``,
   ``train.seed: <seed>``.

Every run config is validated (``drpo_megatron.config.load_config``) when the spec is loaded,
so a bad method or condition fails before any run starts, naming the run and the field.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from drpo_megatron.config import ConfigError, load_config

__all__ = ["StudySpecError", "CollapseRule", "Analysis", "Method", "Condition", "Base",
           "StudySpec", "PlannedRun", "load_spec", "spec_from_dict", "plan_runs", "resolved_spec",
           "RESOLVED_SPEC_FILE", "RUN_CONFIG_FILE", "RUNS_DIR"]

#: The study's resolved spec, written into the study directory (the dashboard detects a
#: study directory by it).
RESOLVED_SPEC_FILE = "study.yaml"
#: Each run's resolved config as passed to ``drpo train --config`` (the run itself writes its
#: fully resolved ``config.yaml`` next to it).
RUN_CONFIG_FILE = "study_run.yaml"
#: Runs live in DIR/runs/<condition>/<method>/seed<seed>.
RUNS_DIR = "runs"
#: Condition and method names become directory names.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class StudySpecError(ValueError):
    """The study spec is invalid; the message names the field, the value and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_name(v: str) -> str:
    if not _NAME_RE.match(v):
        raise ValueError(f"name {v!r} must match {_NAME_RE.pattern} (it becomes a directory "
                         "name: letters, digits, '.', '_', '-')")
    return v


class CollapseRule(_Strict):
    """When a run counts as collapsed (docs/study.md): the earliest of

    * ``non_finite``: a logged ``loss/policy_loss`` or ``loss/grad_norm`` is NaN or infinite
      (grad norms only count in a run that logs a finite one at some step);
    * ``reward``: ``patience`` consecutive logged steps with ``rollout/reward_mean`` below
      ``reward_drop`` x its running best, once that best has reached ``reward_floor``;
    * ``no_termination``: ``patience`` consecutive logged steps with
      ``rollout/truncated_frac`` (responses cut at ``max_new_tokens``) above
      ``truncated_frac``.
    """

    reward_floor: float = Field(0.2, ge=0.0, description="running best must reach this first")
    reward_drop: float = Field(0.5, gt=0.0, lt=1.0, description="fraction of the running best")
    patience: int = Field(10, ge=1, description="consecutive logged steps")
    truncated_frac: float = Field(0.5, ge=0.0, lt=1.0,
                                  description="fraction of responses hitting max_new_tokens")


class Analysis(_Strict):
    """How the summary table reads the curves (docs/study.md)."""

    #: final reward = mean of rollout/reward_mean over a seed's last final_window logged steps
    final_window: int = Field(10, ge=1)
    #: best reward / step to target use the trailing mean over this many logged steps
    smooth: int = Field(5, ge=1)
    #: reward level for "step at which each seed first reached the target"
    target_reward: float = Field(0.8, ge=0.0)
    collapse: CollapseRule = Field(default_factory=CollapseRule)


class Method(_Strict):
    name: str
    loss: dict[str, Any]
    overrides: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v)

    @field_validator("loss")
    @classmethod
    def _loss(cls, v: dict) -> dict:
        if "name" not in v:
            raise ValueError("loss needs a name (a policy loss of drpo_megatron.algorithms, e.g. "
                             "{name: drpo, params: {delta: 12.5}})")
        return v


class Condition(_Strict):
    name: str
    overrides: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v)


class Base(_Strict):
    config: str = ""  # run config YAML; "" = the embedded default
    overrides: dict[str, Any] = Field(default_factory=dict)


class StudySpec(_Strict):
    name: str
    description: str = ""
    base: Base = Field(default_factory=Base)
    seeds: list[int] = Field(min_length=1)
    methods: list[Method] = Field(min_length=1)
    conditions: list[Condition] = Field(min_length=1)
    analysis: Analysis = Field(default_factory=Analysis)
    #: written by the study into DIR/study.yaml (command, commit); ignored when planning
    provenance: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v)

    @model_validator(mode="after")
    def _unique(self) -> "StudySpec":
        for what, names in (("methods", [m.name for m in self.methods]),
                            ("conditions", [c.name for c in self.conditions]),
                            ("seeds", self.seeds)):
            dup = sorted({n for n in names if names.count(n) > 1}, key=str)
            if dup:
                raise ValueError(f"{what}: duplicate {dup}; each must appear once")
        return self


@dataclass
class PlannedRun:
    """One cell x seed: ``run_id`` = ``<condition>/<method>/seed<seed>``, ``run_dir`` its
    directory, ``config`` the run config (a plain mapping, validated)."""

    condition: str
    method: str
    seed: int
    run_dir: Path
    config: dict[str, Any]

    @property
    def run_id(self) -> str:
        return f"{self.condition}/{self.method}/seed{self.seed}"

    @property
    def max_steps(self) -> int:
        return int(self.config["train"]["max_steps"])


def _merge(base: dict, override: dict) -> dict:
    """Nested merge as run configs do (``drpo_megatron.config``): mappings merge key by key,
    except ``params`` (a loss's parameters), which is replaced whole."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "params":
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _pydantic_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        parts.append(f"{loc or '(top level)'}: {msg} (got {got!r})" if not isinstance(got, dict)
                     else f"{loc or '(top level)'}: {msg}")
    return "; ".join(parts)


def spec_from_dict(data: Any, source: str = "spec") -> StudySpec:
    if not isinstance(data, dict):
        raise StudySpecError(f"{source}: the top level must be a mapping with name, seeds, "
                             f"methods, conditions; got {type(data).__name__}")
    try:
        return StudySpec.model_validate(data)
    except ValidationError as e:
        raise StudySpecError(f"{source}: {_pydantic_message(e)}") from None


def load_spec(path: str | Path) -> tuple[StudySpec, Path]:
    """Read a spec YAML; returns the spec and the directory that relative paths refer to."""
    p = Path(path)
    if not p.is_file():
        raise StudySpecError(f"study spec {str(path)!r}: file not found; pass a YAML file such as "
                             "model_configs/studies/paper_claims.yaml")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise StudySpecError(f"study spec {str(path)!r}: not valid YAML ({e})") from e
    return spec_from_dict(data, str(path)), p.resolve().parent


def base_config(spec: StudySpec, spec_dir: Optional[Path] = None) -> dict[str, Any]:
    """Steps 1-3 of the merge (module docstring) as a mapping."""
    data: dict[str, Any] = {}
    if spec.base.config:
        p = Path(spec.base.config).expanduser()
        if not p.is_absolute() and spec_dir is not None:
            p = spec_dir / p
        if not p.is_file():
            raise StudySpecError(f"base.config {spec.base.config!r}: file not found (relative "
                                 f"paths are relative to the spec file: {p})")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise StudySpecError(f"base.config {str(p)!r}: top level must be a mapping")
    return _merge(data, spec.base.overrides)


def plan_runs(spec: StudySpec, out_dir: str | Path, spec_dir: Optional[Path] = None, *,
              validate: bool = True) -> list[PlannedRun]:
    """Every condition x method x seed as a :class:`PlannedRun` (condition-major, then
    method, then seed), each config validated and resolved (``load_config(...).to_dict()``);
    raises :class:`StudySpecError` naming the run.  ``validate=False`` (reading a finished
    study): the merged mappings as they are."""
    out = Path(out_dir).expanduser().resolve()
    base = base_config(spec, spec_dir)
    runs = []
    for cond in spec.conditions:
        for meth in spec.methods:
            for seed in spec.seeds:
                cfg = _merge(base, cond.overrides)
                # the method's loss replaces the base's (params included: {} when not given)
                cfg = _merge(cfg, {"loss": {"params": {}, **meth.loss}})
                cfg = _merge(cfg, meth.overrides)
                run_dir = out / RUNS_DIR / cond.name / meth.name / f"seed{seed}"
                cfg = _merge(cfg, {"name": f"{cond.name}/{meth.name}/seed{seed}",
                                   "output_dir": str(run_dir), "train": {"seed": seed}})
                if not validate:
                    runs.append(PlannedRun(cond.name, meth.name, seed, run_dir, cfg))
                    continue
                try:
                    resolved = load_config(None, cfg).to_dict()
                except ConfigError as e:
                    raise StudySpecError(
                        f"run {cond.name}/{meth.name}/seed{seed} (condition {cond.name!r}, method "
                        f"{meth.name!r}): config error: {e}") from None
                runs.append(PlannedRun(cond.name, meth.name, seed, run_dir, resolved))
    return runs


def resolved_spec(spec: StudySpec, spec_dir: Optional[Path] = None, **provenance) -> dict:
    """What the study writes to DIR/study.yaml: the spec with ``base.config`` inlined (the base
    run config fully resolved, defaults included) plus ``provenance`` (command, commit)."""
    d = spec.model_dump()
    try:
        d["base"] = {"config": "", "overrides": load_config(None, base_config(spec, spec_dir)).to_dict()}
    except ConfigError as e:
        raise StudySpecError(f"base: config error: {e}") from None
    d["provenance"] = dict(provenance)
    return d
