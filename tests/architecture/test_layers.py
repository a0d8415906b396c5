"""The package's layers point one way (docs/architecture.md): no import cycle between packages,
and the lower layers never import the upper ones.  Read from the source (ast), function-level
imports included, so a lazy import cannot hide a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "drpo_megatron"

#: layer of each unit (a subpackage, or a top-level module); imports may only point to a layer
#: below or to the same unit.  Units in one layer must not import each other.
LAYERS = [
    {"errors"},                                    # neutral: imports nothing
    {"schema", "samples", "dist"},                 # neutral: config base, the Sample, ranks
    {"platform"},                                  # CPU compatibility layer
    {"algorithms", "mismatch", "data", "rewards",  # pure: math, metrics, datasets, rewards,
     "weights.formats"},                           #   HF export + FP8/FP4 quantizers
    {"models"},                                    # Megatron-Core model
    {"training"},                                  # the actor
    {"rollout"},                                   # SGLang servers, router, generation
    {"weights"},                                   # transports, pause/verify/resync around them
    {"config"},                                    # the run-config tree
    {"convert", "operate", "dashboard"},           # offline tools and operations
    {"study"},                                     # grids of runs (its page plugs into dashboard)
    {"run"},                                       # builds a run's components
    {"trainer"},                                   # the loop
    {"cli", "__main__"},                           # the command line
]
#: modules of weights/ that are pure formats (no rollout, no actor): a layer of their own
WEIGHT_FORMATS = {"hf_export", "fp8", "fp4"}
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "drpo_megatron" or len(parts) == 1:
        return None
    if parts[1] == "weights" and len(parts) > 2 and parts[2] in WEIGHT_FORMATS:
        return "weights.formats"
    return parts[1]


def _imports(path: Path) -> set[str]:
    rel = path.relative_to(PKG.parent).with_suffix("")
    pkg_parts = list(rel.parts[:-1]) if path.name != "__init__.py" else list(rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # `from pkg import module` imports the module, not pkg
                sub = f"{mod}.{a.name}"
                path = PKG.parent.joinpath(*sub.split("."))
                out.add(sub if path.with_suffix(".py").exists() or path.is_dir() else mod)
    return out


def _edges() -> dict[tuple[str, str], list[str]]:
    edges: dict[tuple[str, str], list[str]] = {}
    for f in PKG.rglob("*.py"):
        if "sglang_site" in f.parts:  # runs inside the SGLang server process, not the package
            continue
        src = _unit(".".join(f.relative_to(PKG.parent).with_suffix("").parts))
        for mod in _imports(f):
            dst = _unit(mod)
            if dst is None or dst == src or dst not in LAYER_OF:
                continue
            edges.setdefault((src, dst), []).append(str(f.relative_to(PKG)))
    return edges


def test_every_unit_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in PKG.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py")}
    units.discard("__init__")
    assert units <= set(LAYER_OF), f"give these a layer in LAYERS: {sorted(units - set(LAYER_OF))}"


def test_imports_point_down():
    bad = [f"{src} -> {dst} ({', '.join(sorted(set(files)))})"
           for (src, dst), files in sorted(_edges().items())
           if LAYER_OF[dst] >= LAYER_OF.get(src, len(LAYERS))]
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


@pytest.mark.parametrize("pure", ["algorithms", "mismatch", "schema", "samples"])
def test_pure_layers_never_import_megatron_or_sglang(pure):
    files = [PKG / f"{pure}.py"] if (PKG / f"{pure}.py").exists() else list((PKG / pure).rglob("*.py"))
    for f in files:
        for mod in _imports(f):
            assert not mod.startswith(("megatron", "sglang", "transformer_engine")), (f, mod)
