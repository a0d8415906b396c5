"""The study page of ``drpo dashboard DIR``: per condition, each method's curves as the mean
over seeds with the min–max spread as a band, and the summary table.

Same page style and script as the run report (:mod:`drpo_megatron.dashboard.report`): inline
SVG, no network; click a method's colour chip to hide / show it everywhere.  Elements carry
their data for DOM readers: line charts have ``data-key="<condition>:<metric>"``, one
``g.series`` per method (``data-points`` = mean, the band's ``data-band`` = [step, min, max]);
summary cells have ``data-cell="<condition>/<method>" data-field data-mean data-std``.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
from typing import Optional

import yaml

from drpo_megatron.dashboard import svg
from drpo_megatron.dashboard.report import _CSS, _JS
from drpo_megatron.study.aggregate import MISMATCH, CellSummary
from drpo_megatron.study.results import CURVE_KEYS, StudyResults

__all__ = ["build_study_report"]

esc = html.escape

_STUDY_CSS = """
table.summary td,table.overview td{font-variant-numeric:tabular-nums}
td.collapsed{background:#fde8e8;font-weight:600}td.state-finished{color:#2c7a2c}
td.state-interrupted{color:#b35c00}td.state-new{color:#999}pre.ovr{margin:0;font-size:11px;
background:#fff;border:1px solid #dde1e7;padding:6px 8px;display:inline-block}
dl.defs dt{font-weight:600;margin-top:6px}dl.defs dd{margin-left:16px;color:#4a5263}
"""


def _pm(t: tuple[float, float, int], digits: int = 3) -> str:
    m, sd, n = t
    if n == 0:
        return "–"
    return f"{svg.fmt(m, digits)} ± {svg.fmt(sd, 2)}" if n > 1 else svg.fmt(m, digits)


def _cell_td(cell: CellSummary, name: str, t: tuple[float, float, int], extra: str = "") -> str:
    m, sd, n = t
    return (f'<td data-cell="{esc(cell.condition)}/{esc(cell.method)}" data-field="{name}" '
            f'data-mean="{m:.7g}" data-std="{sd:.7g}" data-n="{n}">{esc(_pm(t))}{extra}</td>')


def _collapse_td(cell: CellSummary) -> str:
    parts = [f"seed {s.seed}: {s.collapse}" for s in cell.seeds if s.collapse is not None]
    cls = ' class="collapsed"' if parts else ""
    return (f'<td{cls} data-cell="{esc(cell.condition)}/{esc(cell.method)}" data-field="collapses" '
            f'data-count="{cell.collapses}" title="{esc("; ".join(parts))}">{cell.collapses}/'
            f'{len(cell.seeds)}{"<small> " + esc("; ".join(parts)) + "</small>" if parts else ""}</td>')


def _target_td(cell: CellSummary) -> str:
    vals = ", ".join(f"{s.seed}: {s.step_to_target if s.step_to_target is not None else '–'}"
                     for s in cell.seeds)
    return (f'<td data-cell="{esc(cell.condition)}/{esc(cell.method)}" data-field="steps_to_target" '
            f'data-steps="{esc(json.dumps(cell.steps_to_target))}">{esc(vals) or "–"}</td>')


def _summary_table(res: StudyResults, cond: str) -> str:
    a = res.spec.analysis
    rows = []
    for i, meth in enumerate(res.methods):
        cell = res.cells[(cond, meth)]
        runs = res.cell_runs(cond, meth)
        fin = sum(res.states.get(r.run_id) is not None and res.states[r.run_id].state == "finished"
                  for r in runs)
        rows.append(
            f'<tr data-run-row="{i}"><td><span class="chip" style="background:{svg.PALETTE[i % len(svg.PALETTE)]}">'
            f'</span> <b>{esc(meth)}</b></td>'
            + _cell_td(cell, "final_reward", cell.final_reward)
            + _cell_td(cell, "best_reward", cell.best_reward)
            + _cell_td(cell, "final_eval", cell.final_eval)
            + _target_td(cell) + _collapse_td(cell)
            + _cell_td(cell, "mismatch_mean", cell.mismatch_mean)
            + f'<td>{fin}/{len(runs)}</td></tr>')
    return ('<table class="summary"><thead><tr><th>method</th>'
            f'<th>final reward (last {a.final_window} steps)</th>'
            f'<th>best reward ({a.smooth}-step mean)</th><th>final eval accuracy</th>'
            f'<th>step reaching reward ≥ {a.target_reward:g} (per seed)</th><th>collapses</th>'
            '<th>mean |log π − log µ|</th><th>runs finished</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def summary_markdown(res: StudyResults) -> str:
    """The summary tables as Markdown (``DIR/summary.md``, for reports such as
    docs/paper-claims.md): one table per condition, the columns of the page's summary table
    (definitions: docs/study.md), then mean |log π − log µ| per condition x method."""
    a = res.spec.analysis
    out = [f"# Study `{res.spec.name}`: summary", "",
           f"{res.spec.description}".strip(), "",
           "mean ± std over seeds (ddof = 1); definitions: docs/study.md.", ""]
    head = (f"| method | final reward (last {a.final_window} steps) | best reward "
            f"({a.smooth}-step mean) | final eval accuracy | step reaching reward ≥ "
            f"{a.target_reward:g} (per seed) | collapses | mean abs(log π − log µ) |")
    for cond in res.conditions:
        out += [f"## {cond}", "", head, "|---|---|---|---|---|---|---|"]
        for meth in res.methods:
            cell = res.cells[(cond, meth)]
            target = ", ".join(f"{s.seed}: {s.step_to_target if s.step_to_target is not None else '–'}"
                               for s in cell.seeds) or "–"
            why = "; ".join(f"seed {s.seed}: {s.collapse}" for s in cell.seeds if s.collapse)
            out.append(f"| {meth} | {_pm(cell.final_reward)} | {_pm(cell.best_reward)} | "
                       f"{_pm(cell.final_eval)} | {target} | {cell.collapses}/{len(cell.seeds)}"
                       f"{' (' + why + ')' if why else ''} | {_pm(cell.mismatch_mean, 4)} |")
        out.append("")
    out += ["## mean abs(log π − log µ) per condition", "",
            "| method | " + " | ".join(res.conditions) + " |",
            "|---|" + "---|" * len(res.conditions)]
    for meth in res.methods:
        out.append(f"| {meth} | " + " | ".join(_pm(res.cells[(c, meth)].mismatch_mean, 4)
                                               for c in res.conditions) + " |")
    return "\n".join(out) + "\n"


def _curve_chart(res: StudyResults, cond: str, key: str, title: str, n: list[int]) -> str:
    series = []
    for i, meth in enumerate(res.methods):
        c = res.curves[(cond, meth, key)]
        if not c.steps:
            continue
        series.append({"run": meth, "idx": i, "color": svg.PALETTE[i % len(svg.PALETTE)],
                       "xs": c.steps, "ys": c.mean, "key": f"{cond}:{key}",
                       "band": (c.steps, c.min, c.max)})
    if not series:
        return ""
    n[0] += 1
    log = True if key.startswith("mismatch/") and key != "mismatch/token_mult_prob_error" else None
    return svg.line_chart(chart_id=f"s{n[0]}-{cond}-{key}".replace("/", "-"), key=f"{cond}:{key}",
                          title=title, subtitle=f"{key}: mean over seeds (line), min–max (band)",
                          series=series, log_y=log)


def _overview(res: StudyResults, n: list[int]) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in res.conditions)
    rows = []
    for i, meth in enumerate(res.methods):
        tds = []
        for cond in res.conditions:
            cell = res.cells[(cond, meth)]
            col = (f'<small> {cell.collapses}/{len(cell.seeds)} collapsed</small>'
                   if cell.collapses else "")
            tds.append(_cell_td(cell, "final_reward", cell.final_reward, col))
        rows.append(f'<tr data-run-row="{i}"><td><span class="chip" data-toggle-run="{i}" '
                    f'title="click to hide / show this method" style="background:'
                    f'{svg.PALETTE[i % len(svg.PALETTE)]}"></span> <b>{esc(meth)}</b></td>'
                    f'{"".join(tds)}</tr>')
    table = (f'<table class="overview"><thead><tr><th>final reward (mean ± std over seeds)</th>'
             f'{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')
    charts = []
    for field, title, _key, log in (
            ("final_reward", "final reward by condition", "final_reward", None),
            ("mismatch_mean", "mean |log π − log µ| by condition (calibration)", MISMATCH, True)):
        groups = []
        for i, meth in enumerate(res.methods):
            ts = [getattr(res.cells[(c, meth)], field) for c in res.conditions]
            if not any(t[2] for t in ts):
                continue
            groups.append({"run": meth, "idx": i, "color": svg.PALETTE[i % len(svg.PALETTE)],
                           "values": [t[0] for t in ts],
                           "lo": [t[0] - t[1] if t[2] else math.nan for t in ts],
                           "hi": [t[0] + t[1] if t[2] else math.nan for t in ts]})
        if groups:
            n[0] += 1
            charts.append(svg.bar_chart(chart_id=f"s{n[0]}-{field}", key=f"overview:{field}",
                                        title=title, subtitle="mean over seeds, whisker ± std",
                                        categories=res.conditions, groups=groups, log_y=log))
    return table + f'<div class="grid" style="margin-top:12px">{"".join(charts)}</div>'


def _runs_table(res: StudyResults) -> str:
    rows = []
    for r in res.runs:
        st = res.states.get(r.run_id)
        run = res.loaded.get(r.run_id)
        notes = "; ".join(run.problems) if run is not None else "not started"
        rows.append(f'<tr data-run-id="{esc(r.run_id)}"><td>{esc(r.run_id)}</td>'
                    f'<td class="state-{st.state if st else "na"}">{st.state if st else "?"}</td>'
                    f'<td>{st.last_step if st and st.last_step is not None else "–"}/{r.max_steps}</td>'
                    f'<td>{st.checkpoint_step if st and st.checkpoint_step is not None else "–"}</td>'
                    f'<td class="path">{esc(str(r.run_dir))}</td><td class="notes">{esc(notes)}</td></tr>')
    return ('<section id="runs"><details><summary><h2>Runs ({})</h2></summary><table class="runs">'
            '<thead><tr><th>run</th><th>state</th><th>last step</th><th>checkpoint step</th>'
            '<th>directory</th><th>notes</th></tr></thead><tbody>{}</tbody></table></details>'
            '</section>').format(len(res.runs), "".join(rows))


def _definitions(res: StudyResults) -> str:
    a, c = res.spec.analysis, res.spec.analysis.collapse
    items = [
        ("curves", "line = mean over the seeds that logged the step; band = min–max over them."),
        ("final reward", f"mean of rollout/reward_mean over a seed's last {a.final_window} logged "
                         "steps; the table shows mean ± sample std (ddof 1) over seeds."),
        ("best reward", f"maximum over steps of the trailing {a.smooth}-step mean of the reward."),
        ("step reaching the target", f"first step whose trailing {a.smooth}-step mean reward is ≥ "
                                     f"{a.target_reward:g}; – = never."),
        ("final eval accuracy", "the last logged eval/accuracy (held-out problems)."),
        ("collapse", "the earliest of: a non-finite loss/policy_loss or loss/grad_norm; "
                     f"{c.patience} consecutive logged steps with rollout/reward_mean below "
                     f"{c.reward_drop:g} × its running best, once that best reached "
                     f"{c.reward_floor:g}; {c.patience} consecutive logged steps with "
                     f"rollout/truncated_frac > {c.truncated_frac:g} (responses no longer "
                     "terminating). Reported at the first step of the streak."),
    ]
    return ('<section id="definitions"><h2>Definitions</h2><dl class="defs">'
            + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items) + "</dl></section>")


def build_study_report(res: StudyResults, *, title: Optional[str] = None,
                       live_interval_s: Optional[float] = None, version: str = "") -> str:
    """The complete HTML document of a study (a string)."""
    title = title or f"Study: {res.spec.name}"
    n = [0]
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    hide_css = "".join(f".hide-r{i} [data-run-idx=\"{i}\"]{{display:none}}"
                       for i in range(len(res.methods)))
    finished = sum(s.state == "finished" for s in res.states.values())
    prov = res.spec.provenance
    meta = (f"generated {esc(now)} · {len(res.conditions)} conditions × {len(res.methods)} methods × "
            f"{len(res.spec.seeds)} seeds = {len(res.runs)} runs, {finished} finished"
            + (f" · commit {esc(str(prov.get('commit')))}" if prov.get("commit") else ""))
    sections = []
    for cond_spec in res.spec.conditions:
        cond = cond_spec.name
        charts = [_curve_chart(res, cond, k, t, n) for k, t in CURVE_KEYS]
        ovr = yaml.safe_dump(cond_spec.overrides, sort_keys=False).strip() if cond_spec.overrides \
            else "(the base config)"
        sections.append(
            f'<section id="cond-{esc(cond)}" data-condition="{esc(cond)}"><h2>Condition: '
            f'{esc(cond)}</h2><div class="intro">overrides: <pre class="ovr">{esc(ovr)}</pre></div>'
            f'{_summary_table(res, cond)}<div class="grid" style="margin-top:12px">'
            f'{"".join(c for c in charts if c)}</div></section>')
    nav = "".join(f'<a href="#{s}">{esc(t)}</a>' for s, t in
                  [("overview", "overview")] + [(f"cond-{c}", c) for c in res.conditions]
                  + [("runs", "runs"), ("definitions", "definitions")])
    body = [
        f'<header><h1>{esc(title)}</h1><div class="meta">{meta}</div><nav>{nav}</nav></header><main>',
        (f'<div class="live">Live: this page checks the study every {live_interval_s:g} s and '
         f'reloads when it changes.</div>' if live_interval_s else ""),
        f'<section id="overview"><h2>Overview</h2><p class="intro">{esc(res.spec.description)}</p>'
        f'{_overview(res, n)}</section>',
        *sections, _runs_table(res), _definitions(res), '</main><div id="tip"></div>',
    ]
    live_attr = (f' data-live-interval="{live_interval_s:g}" data-version="{esc(version)}"'
                 if live_interval_s else "")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
            f"<style>{_CSS}{_STUDY_CSS}{hide_css}</style></head><body data-study=\"{esc(res.spec.name)}\""
            f" data-runs=\"{len(res.runs)}\"{live_attr}>" + "".join(body)
            + f"<script>{_JS}</script></body></html>\n")
