"""Build the self-contained HTML mismatch report from loaded runs.

The page has no external references (no CDN, fonts or images): charts are inline SVG
generated here, and a small inline script adds hover read-outs, legend toggles and (in
``--serve`` mode) live reload. Sections:

1. runs (legend from each config) and a health table (last steps vs the field's thresholds);
2. mismatch over steps with health thresholds marked;
3. where mismatch concentrates: gaps by rollout-probability (mu) decade;
4. trust region: DRPO gradient-weight distribution, DPPO boundary fractions;
5. gap distributions (per-token histograms of the latest step, quantile bands over steps);
6. gaps split by advantage sign and response position; MoE routing disagreement;
7. loss and reward curves; 8. step-time breakdown; 9. every logged scalar (collapsed).
"""

from __future__ import annotations

import datetime as _dt
import html
import math
import re
from typing import Optional, Sequence

from ..mismatch.catalog import (ADV_LABELS, METRICS, MU_BIN_LABELS, POSITION_LABELS, Threshold,
                                spec_for)
from . import svg
from .data import Run

__all__ = ["build_report", "HEALTH_KEYS", "MISMATCH_CHART_KEYS"]

esc = html.escape

#: Steps averaged for the health table ("where is the run now").
HEALTH_WINDOW = 10

HEALTH_KEYS = (
    "mismatch/logprob_abs_diff",
    "mismatch/token_mult_prob_error",
    "mismatch/kl_k3_rollout_train",
    "mismatch/prob_abs_diff_max",
    "mismatch/is_ess",
    "mismatch/ratio_outside_frac",
    "mismatch/beyond_dppo_tv_frac",
    "mismatch/drpo_weight_neg_frac",
    "mismatch/nonfinite_rollout_tokens",
    "mismatch/moe/route_mismatch_frac",
)

MISMATCH_CHART_KEYS = (
    ("mismatch/logprob_abs_diff", "mean |log π − log µ|"),
    ("mismatch/token_mult_prob_error", "token_mult_prob_error = mean exp|log π − log µ|"),
    ("mismatch/kl_k3_rollout_train", "KL(µ‖π), k3"),
    ("mismatch/kl_k3_train_rollout", "KL(π‖µ), IS-weighted k3"),
    ("mismatch/js_divergence", "Jensen–Shannon(µ, π)"),
    ("mismatch/prob_abs_diff_mean", "mean |π − µ|"),
    ("mismatch/prob_abs_diff_max", "max |π − µ|"),
    ("mismatch/prob_pearson", "Pearson corr(π, µ)"),
    ("mismatch/chi2_token", "χ² per token (E r² − 1)"),
    ("mismatch/chi2_seq", "χ² per sequence"),
    ("mismatch/is_ess", "IS-weight ESS (tokens, normalised)"),
    ("mismatch/is_ess_seq", "IS-weight ESS (sequences)"),
    ("mismatch/ratio_outside_frac", "tokens with r outside [1/c, c]"),
    ("mismatch/logprob_abs_diff_max", "max |log π − log µ|"),
    ("mismatch/logprob_diff_mean", "mean (log π − log µ), signed"),
    ("mismatch/nonfinite_rollout_tokens", "non-finite rollout log-probs (excluded)"),
)

#: asynchronous rollouts (rollout.mode: async): shown beside the mismatch, which staleness widens
STALENESS_CHART_KEYS = (
    ("rollout/staleness_mean", "staleness: weight versions behind the trainer (mean)"),
    ("rollout/staleness_max", "staleness (max)"),
)

MU_BIN_TITLES = {"lt_1e-4": "<1e-4", "1e-4_1e-3": "1e-4–1e-3", "1e-3_1e-2": "1e-3–1e-2",
                 "1e-2_1e-1": "0.01–0.1", "1e-1_1": "0.1–1"}

TIME_PARTS = (("perf/rollout_time_s", "rollout", "#4e79a7"),
              ("perf/train_time_s", "train", "#f28e2b"),
              ("perf/weight_sync_time_s", "weight sync", "#59a14f"))
OTHER_TIME_COLOR = "#bab0ac"

#: Charts in the loss/reward section beyond which keys only appear in the all-scalars table.
MAX_CURVE_CHARTS = 16


def _mean(v: Sequence[float]) -> float:
    v = [x for x in v if math.isfinite(x)]
    return sum(v) / len(v) if v else math.nan


class _Ctx:
    def __init__(self, runs: list[Run], window: int):
        self.runs = runs
        self.window = window
        self.n = 0

    def cid(self, stem: str) -> str:
        self.n += 1
        return f"c{self.n}-" + "".join(ch if ch.isalnum() else "-" for ch in stem)[:60]

    def any(self, key: str) -> bool:
        return any(r.has(key) for r in self.runs)


def _thresholds(key: str) -> tuple[Threshold, ...]:
    s = spec_for(key)
    return s.thresholds if s else ()


def _log_hint(key: str) -> Optional[bool]:
    s = spec_for(key)
    return True if (s and s.log_scale) else None


def _subtitle(key: str) -> str:
    s = spec_for(key)
    if not s:
        return key
    return f"{key} = {s.formula}"


def _line(ctx: _Ctx, key: str, title: str = "", *, band: Optional[tuple[str, str]] = None,
          log: Optional[bool] = None, subtitle: Optional[str] = None) -> str:
    series = []
    for r in ctx.runs:
        if not r.has(key):
            continue
        xs, ys = r.series(key)
        s = {"run": r.label, "idx": r.idx, "color": r.color, "xs": xs, "ys": ys, "key": key}
        if band and r.has(band[0]) and r.has(band[1]):
            bx, lo = r.series(band[0])
            hi_map = r.scalars[band[1]]
            s["band"] = (bx, lo, [hi_map.get(x, math.nan) for x in bx])
        series.append(s)
    if not series:
        return ""
    markers = [{"x": s, "label": f"{r.label}: resumed at step {s}", "color": r.color}
               for r in ctx.runs for s in r.resumes]
    return svg.line_chart(chart_id=ctx.cid(key), key=key, title=title or key, series=series,
                          subtitle=_subtitle(key) if subtitle is None else subtitle,
                          thresholds=_thresholds(key),
                          log_y=log if log is not None else _log_hint(key), markers=markers)


def _quantile_band(ctx: _Ctx, name: str, title: str, log: Optional[bool] = None) -> str:
    series = []
    for r in ctx.runs:
        h = r.histograms.get(name)
        if not h:
            continue
        steps = sorted(s for s in h if h[s].get("quantiles"))
        if not steps:
            continue
        q = lambda s, p, h=h: float(h[s]["quantiles"].get(p, math.nan))  # noqa: E731
        series.append({"run": r.label, "idx": r.idx, "color": r.color, "xs": steps,
                       "ys": [q(s, "0.5") for s in steps], "key": name,
                       "band": (steps, [q(s, "0.05") for s in steps], [q(s, "0.95") for s in steps])})
    if not series:
        return ""
    return svg.line_chart(chart_id=ctx.cid(name + "-q"), key=name + "#quantiles", title=title,
                          subtitle=f"{name}: median (line), 5–95% of tokens (band), per step",
                          series=series, log_y=log)


def _hist(ctx: _Ctx, name: str, title: str, x_label: str, markers=()) -> str:
    hists = []
    for r in ctx.runs:
        got = r.latest_histogram(name)
        if got:
            step, h = got
            hists.append({**h, "run": r.label, "idx": r.idx, "color": r.color, "step": step})
    if not hists:
        return ""
    steps = ", ".join(f"{h['run']}: step {h['step']}" for h in hists)
    return svg.hist_chart(chart_id=ctx.cid(name + "-h"), key=name, title=title,
                          subtitle=f"latest step per run ({steps})", hists=hists,
                          x_label=x_label, markers=markers)


#: Metrics whose ideal value is 1: their bars grow from 1 so that small excesses stay visible.
_BAR_BASELINE_ONE = ("token_mult_prob_error", "is_ess", "prob_pearson")


def _bars(ctx: _Ctx, prefix: str, labels: Sequence[str], metric: str, title: str,
          titles: Optional[dict] = None) -> str:
    keys = [f"mismatch/{prefix}/{b}/{metric}" for b in labels]
    groups = []
    for r in ctx.runs:
        if not any(r.has(k) for k in keys):
            continue
        vals, lo, hi = [], [], []
        for k in keys:
            v = r.window_values(k, ctx.window)
            vals.append(_mean(v))
            lo.append(min(v) if v else math.nan)
            hi.append(max(v) if v else math.nan)
        groups.append({"run": r.label, "idx": r.idx, "color": r.color, "values": vals, "lo": lo,
                       "hi": hi})
    if not groups:
        return ""
    win = f"last {ctx.window} steps" if ctx.window else "all steps"
    spec = METRICS.get(metric)
    sub = f"mean over {win}, whisker min–max · mismatch/{prefix}/<bin>/{metric}"
    return svg.bar_chart(chart_id=ctx.cid(f"{prefix}-{metric}"), key=f"mismatch/{prefix}/*/{metric}",
                         title=title, subtitle=sub,
                         categories=[(titles or {}).get(b, b) for b in labels], groups=groups,
                         log_y=False if metric in _BAR_BASELINE_ONE else None,
                         baseline=1.0 if metric in _BAR_BASELINE_ONE else 0.0,
                         thresholds=[t for t in (spec.thresholds if spec else ())
                                     if t.kind != "ideal"])


def _moe_layers(runs: list[Run]) -> list[int]:
    """Layer indices of the per-layer routing keys (``mismatch/moe/layer_<i>/...``) any run has."""
    found = set()
    for r in runs:
        for k in r.scalars:
            m = _MOE_LAYER_KEY.match(k)
            if m and r.has(k):
                found.add(int(m.group(1)))
    return sorted(found)


_MOE_LAYER_KEY = re.compile(r"^mismatch/moe/layer_(\d+)/route_mismatch_frac$")


def _section(title: str, intro: str, charts: Sequence[str], sid: str) -> str:
    charts = [c for c in charts if c]
    if not charts:
        return ""
    return (f'<section id="{sid}"><h2>{esc(title)}</h2><p class="intro">{intro}</p>'
            f'<div class="grid">{"".join(charts)}</div></section>')


def _runs_table(runs: list[Run]) -> str:
    rows = []
    for r in runs:
        steps = r.steps
        span = f"{steps[0]}–{steps[-1]} ({len(steps)})" if steps else "–"
        last = max(r.times.values()) if r.times else None
        last_s = _dt.datetime.fromtimestamp(last).strftime("%Y-%m-%d %H:%M:%S") if last else "–"
        notes = list(r.problems)
        if r.resumes:
            notes.append("resumed at step " + ", ".join(map(str, r.resumes)))
        rows.append(
            f'<tr class="run" data-run-row="{r.idx}"><td><span class="chip" data-toggle-run="{r.idx}" '
            f'title="click to hide / show this run" style="background:{r.color}"></span></td>'
            f'<td><b>{esc(r.label)}</b></td><td>{esc(r.info.get("model", ""))}</td>'
            f'<td>{esc(r.info.get("loss", ""))}</td><td>{esc(r.info.get("precision", ""))}</td>'
            f'<td>{esc(span)}</td><td>{esc(last_s)}</td><td class="path">{esc(str(r.path))}</td>'
            f'<td class="notes">{esc("; ".join(notes))}</td></tr>')
    return ('<table class="runs"><thead><tr><th></th><th>run</th><th>model</th><th>loss</th>'
            '<th>precision</th><th>steps</th><th>last update</th><th>directory</th><th>notes</th>'
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _health_status(key: str, value: float) -> tuple[str, str]:
    if not math.isfinite(value):
        return "na", "n/a"
    warns = [t for t in _thresholds(key) if t.kind == "warn"]
    if key.endswith("nonfinite_rollout_tokens") or key.endswith("nonfinite_train_tokens"):
        return ("bad", "non-finite log-probs") if value > 0 else ("ok", "none")
    for t in warns:
        if (t.direction == "above" and value > t.value) or (t.direction == "below" and value < t.value):
            return "bad", f"{'>' if t.direction == 'above' else '<'} {svg.fmt(t.value)} ({t.source})"
    if warns:
        t = warns[0]
        return "ok", f"{'≤' if t.direction == 'above' else '≥'} {svg.fmt(t.value)} ({t.source})"
    return "info", ""


def _health_table(runs: list[Run]) -> str:
    keys = [k for k in HEALTH_KEYS if any(r.has(k) for r in runs)]
    if not keys:
        return '<p class="intro">No mismatch metrics logged yet.</p>'
    head = "".join(f'<th style="border-bottom:3px solid {r.color}">{esc(r.label)}</th>' for r in runs)
    rows = []
    for k in keys:
        spec = spec_for(k)
        cells = []
        for r in runs:
            v = _mean(r.window_values(k, HEALTH_WINDOW))
            st, why = _health_status(k, v)
            cells.append(f'<td class="h-{st}" data-run-idx="{r.idx}" data-key="{esc(k)}" '
                         f'data-value="{v:.7g}" title="{esc(why)}">{esc(svg.fmt(v, 4))}'
                         f'{"<small> " + esc(why) + "</small>" if why else ""}</td>')
        healthy = esc(spec.healthy) if spec else ""
        rows.append(f'<tr><td><code>{esc(k)}</code></td>{"".join(cells)}<td class="healthy">'
                    f'{healthy}</td></tr>')
    return (f'<table class="health"><thead><tr><th>metric (mean of last {HEALTH_WINDOW} steps)</th>'
            f'{head}<th>healthy range</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _time_section(ctx: _Ctx) -> str:
    charts = [_line(ctx, "perf/step_time_s", "step time", subtitle="perf/step_time_s (seconds)")]
    rows = []
    for r in ctx.runs:
        parts = [_mean(r.window_values(k, ctx.window)) for k, _, _ in TIME_PARTS]
        total = _mean(r.window_values("perf/step_time_s", ctx.window))
        known = sum(p for p in parts if math.isfinite(p))
        other = total - known if math.isfinite(total) else math.nan
        if not any(math.isfinite(p) for p in parts + [total]):
            continue
        rows.append({"run": r.label, "idx": r.idx, "color": r.color,
                     "parts": parts + [other if math.isfinite(other) and other > 0 else math.nan]})
    if rows:
        win = f"last {ctx.window} steps" if ctx.window else "all steps"
        charts.insert(0, svg.stacked_bar_chart(
            chart_id=ctx.cid("time-breakdown"), key="perf/*_time_s",
            title=f"step-time breakdown (mean over {win})",
            subtitle="rollout / train / weight sync; other = step_time_s − their sum",
            rows=rows, part_names=[n for _, n, _ in TIME_PARTS] + ["other"],
            part_colors=[c for _, _, c in TIME_PARTS] + [OTHER_TIME_COLOR]))
    perf_keys = sorted({k for r in ctx.runs for k in r.scalars if k.startswith("perf/")
                        and k != "perf/step_time_s"})
    charts += [_line(ctx, k, k, subtitle=k) for k in perf_keys[:MAX_CURVE_CHARTS]]
    return _section("Step time", "Where each step's wall-clock time goes, per run.", charts, "time")


def _with_staleness(ctx: _Ctx, runs, charts: list[str]) -> list[str]:
    """The staleness charts of asynchronous runs right after the first mismatch chart (samples
    k versions old are a mismatch of their own: π of the current weights vs µ of older ones)."""
    extra = [_line(ctx, k, t) for k, t in STALENESS_CHART_KEYS
             if any(r.has(k) and any(v > 0 for v in r.window_values(k)) for r in runs)]
    return charts[:1] + extra + charts[1:]


def _curves_section(ctx: _Ctx) -> str:
    keys = sorted({k for r in ctx.runs for k in r.scalars})
    first = [k for k in ("rollout/reward_mean",) if k in keys]
    loss = [k for k in keys if k.startswith("loss/")]
    other = [k for k in keys if (k.startswith("rollout/") or k.startswith("eval/")
                                 or k.startswith("train/")) and k not in first]
    chosen = (first + loss + other)[:MAX_CURVE_CHARTS]
    charts = [_line(ctx, k, k, subtitle=k) for k in chosen]
    return _section("Loss and reward", "Loss terms and rollout rewards over steps.", charts,
                    "curves")


def _all_scalars(ctx: _Ctx) -> str:
    keys = sorted({k for r in ctx.runs for k in r.scalars})
    if not keys:
        return ""
    head = "".join(f'<th colspan="2" style="border-bottom:3px solid {r.color}">{esc(r.label)}</th>'
                   for r in ctx.runs)
    rows = []
    for k in keys:
        cells = []
        for r in ctx.runs:
            xs, ys = r.series(k)
            f = [y for y in ys if math.isfinite(y)]
            if not f:
                cells.append(f'<td data-run-idx="{r.idx}"></td><td data-run-idx="{r.idx}"></td>')
                continue
            cells.append(f'<td data-run-idx="{r.idx}" title="last / mean / min / max">'
                         f'{esc(svg.fmt(f[-1], 4))}<small> μ {esc(svg.fmt(_mean(f), 3))} '
                         f'[{esc(svg.fmt(min(f), 3))}, {esc(svg.fmt(max(f), 3))}]</small></td>'
                         f'<td data-run-idx="{r.idx}">{svg.sparkline(xs, ys, r.color)}</td>')
        rows.append(f'<tr><td><code>{esc(k)}</code></td>{"".join(cells)}</tr>')
    return (f'<section id="all"><details><summary><h2>All logged scalars ({len(keys)})</h2>'
            f'</summary><table class="all"><thead><tr><th>key</th>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></details></section>')


_CSS = """
*{box-sizing:border-box}body{font:13px/1.4 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;
margin:0;background:#f4f5f7;color:#1d2330}header{background:#1d2330;color:#fff;padding:14px 22px}
header h1{margin:0;font-size:20px}header .meta{opacity:.75;font-size:12px}
main{padding:10px 22px 40px;max-width:1680px;margin:auto}h2{font-size:16px;margin:22px 0 4px}
.intro{margin:0 0 10px;color:#4a5263;max-width:1100px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(460px,1fr));gap:12px}
figure.chart{margin:0;background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:8px 8px 4px}
figcaption{font-weight:600;font-size:13px}figcaption .sub{font-weight:400;color:#6b7385;font-size:11px;
white-space:nowrap;overflow:hidden;text-overflow:ellipsis}figure .note{font-size:11px;color:#6b7385}
svg{width:100%;height:auto;display:block}svg text{font-size:10.5px;fill:#4a5263}
svg .tick{font-size:10px}svg .alabel{font-size:10.5px;fill:#6b7385}
.grid line,line.grid{stroke:#eef0f3}line.axis,line.xtick{stroke:#9aa1ad}
path.line{fill:none;stroke-width:1.7;stroke-linejoin:round}path.band{opacity:.18;stroke:none}
path.area{fill-opacity:.10}line.whisker{stroke:#1d2330;stroke-width:1.2}
line.hover{stroke:#1d2330;stroke-width:.8;stroke-dasharray:2,2}
.threshold line{stroke-width:1.3}.threshold text{font-size:10px}
.threshold.warn line{stroke:#d62728;stroke-dasharray:7,4}.threshold.warn text{fill:#d62728}
.threshold.ideal line{stroke:#2ca02c;stroke-dasharray:2,3}.threshold.ideal text{fill:#2ca02c}
.threshold.reference line{stroke:#7f7f7f;stroke-dasharray:5,4}.threshold.reference text{fill:#555}
.threshold.offscale text{fill:#d62728}.marker line{stroke-dasharray:1,3;stroke-width:1.2}
table{border-collapse:collapse;background:#fff;border:1px solid #dde1e7}
th,td{padding:4px 8px;border-bottom:1px solid #eef0f3;text-align:left;vertical-align:top}
th{background:#fafbfc;font-weight:600}td small{color:#6b7385;margin-left:4px}
td.path{font-family:monospace;font-size:11px;color:#6b7385}td.notes{color:#b35c00;font-size:12px}
.chip{display:inline-block;width:16px;height:16px;border-radius:3px;cursor:pointer;vertical-align:middle}
.chip.off{opacity:.2}.h-ok{background:#eaf6ea}.h-bad{background:#fde8e8;font-weight:600}
.h-na{color:#999}td.healthy{color:#4a5263;font-size:12px;max-width:420px}
table.all td{font-size:12px}details summary h2{display:inline}
#tip{position:absolute;display:none;background:#fff;border:1px solid #9aa1ad;border-radius:4px;
padding:5px 8px;font-size:12px;pointer-events:none;box-shadow:0 2px 6px rgba(0,0,0,.15);z-index:9}
.live{background:#fff3cd;border:1px solid #e6cf84;padding:6px 10px;border-radius:4px;margin:8px 0}
nav a{color:#cfd6e4;margin-right:12px;font-size:12px}
"""

_JS = r"""
(function(){
  function fmt(v){ if(v===null||v===undefined) return 'n/a'; var a=Math.abs(v);
    return (a!==0&&(a<1e-3||a>=1e5))?v.toExponential(3):(+v.toPrecision(5)).toString(); }
  function esc(s){ return String(s).replace(/[&<>"]/g,function(c){return {'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c];}); }
  // 1. Record what the browser actually drew (read back by tests through --dump-dom).
  var drawn=0, total=0, bars=0;
  document.querySelectorAll('g.series').forEach(function(g){
    var len=0; g.querySelectorAll('path.line').forEach(function(p){ try{ len+=p.getTotalLength(); }catch(e){} });
    len+=g.querySelectorAll('circle').length;
    g.setAttribute('data-drawn-length', len.toFixed(1)); total++; if(len>0) drawn++;
  });
  document.querySelectorAll('rect.bar').forEach(function(r){ var b=r.getBBox(); if(b.width>0&&b.height>0) bars++; });
  document.body.setAttribute('data-series-total', total);
  document.body.setAttribute('data-series-drawn', drawn);
  document.body.setAttribute('data-bars-drawn', bars);
  // 2. Legend: click a run's colour chip to hide / show it everywhere.
  document.querySelectorAll('[data-toggle-run]').forEach(function(el){
    el.addEventListener('click', function(){ document.body.classList.toggle('hide-r'+el.getAttribute('data-toggle-run')); el.classList.toggle('off'); });
  });
  // 3. Hover read-out on line charts.
  var tip=document.getElementById('tip');
  document.querySelectorAll('svg.linechart').forEach(function(sv){
    var x0=+sv.dataset.x0, x1=+sv.dataset.x1, p0=+sv.dataset.px0, p1=+sv.dataset.px1;
    var hover=sv.querySelector('line.hover');
    var ss=[].map.call(sv.querySelectorAll('g.series'), function(g){
      var p=g.querySelector('path.line'); return {run:g.getAttribute('data-run'), idx:g.getAttribute('data-run-idx'),
        color:p?p.getAttribute('stroke'):'#000', pts:JSON.parse(g.getAttribute('data-points')||'[]')}; });
    sv.addEventListener('mousemove', function(ev){
      var pt=sv.createSVGPoint(); pt.x=ev.clientX; pt.y=ev.clientY;
      var loc=pt.matrixTransform(sv.getScreenCTM().inverse()); var xv=x0+(loc.x-p0)/(p1-p0)*(x1-x0);
      var rows=[], best=null;
      ss.forEach(function(s){
        if(document.body.classList.contains('hide-r'+s.idx)) return;
        var bp=null; s.pts.forEach(function(q){ if(q[1]!==null&&(bp===null||Math.abs(q[0]-xv)<Math.abs(bp[0]-xv))) bp=q; });
        if(bp){ rows.push('<span style="color:'+s.color+'">&#9632;</span> '+esc(s.run)+' &middot; step '+bp[0]+': <b>'+fmt(bp[1])+'</b>');
          if(best===null||Math.abs(bp[0]-xv)<Math.abs(best-xv)) best=bp[0]; }
      });
      if(best===null){ tip.style.display='none'; return; }
      var hx=p0+(best-x0)/(x1-x0)*(p1-p0); hover.setAttribute('x1',hx); hover.setAttribute('x2',hx);
      tip.innerHTML=rows.join('<br>'); tip.style.display='block';
      tip.style.left=(ev.pageX+14)+'px'; tip.style.top=(ev.pageY+14)+'px';
    });
    sv.addEventListener('mouseleave', function(){ tip.style.display='none'; hover.setAttribute('x1',-10); hover.setAttribute('x2',-10); });
  });
  // 4. Live mode (drpo dashboard --serve): reload when the runs' files change.
  var live=document.body.getAttribute('data-live-interval');
  if(live){ var ver=document.body.getAttribute('data-version');
    setInterval(function(){ fetch('/__version',{cache:'no-store'}).then(function(r){return r.text();})
      .then(function(v){ if(v.trim()!==ver){ location.reload(); } }).catch(function(){}); }, (+live)*1000); }
})();
"""


def build_report(runs: list[Run], *, title: str = "DRPO mismatch report", window: int = 0,
                 live_interval_s: Optional[float] = None, version: str = "") -> str:
    """The complete HTML document (a string). ``window``: steps averaged by the bar charts
    (0 = all). ``live_interval_s``: poll ``/__version`` that often and reload on change."""
    ctx = _Ctx(runs, window)
    hide_css = "".join(f".hide-r{r.idx} [data-run-idx=\"{r.idx}\"]{{display:none}}" for r in runs)
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")

    mismatch = _section(
        "Mismatch over training",
        "Trainer (π) vs rollout engine (µ) log-probs of the sampled response tokens, per step. "
        "Dashed red lines: thresholds the field uses (source in brackets); green dotted: ideal; "
        "grey dashed: a published healthy reference. Hover for values, click a colour chip in the "
        "run table to hide a run.",
        _with_staleness(ctx, runs, [_line(ctx, k, t) for k, t in MISMATCH_CHART_KEYS
                                    if k != "mismatch/nonfinite_rollout_tokens"
                                    or any(any(v > 0 for v in r.window_values(k)) for r in runs)]),
        "mismatch")
    bins = _section(
        "Where mismatch concentrates: gaps by rollout probability µ",
        "Tokens binned by the engine's probability µ of the sampled token (decades). Low-µ tokens "
        "carry large log-ratio gaps but tiny probability gaps — exactly why DRPO regularises |π − µ| "
        "rather than the ratio (χ²). Compare runs bin by bin.",
        [_bars(ctx, "by_mu", MU_BIN_LABELS, m, t, MU_BIN_TITLES) for m, t in (
            ("logprob_abs_diff", "mean |log π − log µ| by µ"),
            ("prob_abs_diff_mean", "mean |π − µ| by µ"),
            ("token_mult_prob_error", "token_mult_prob_error by µ"),
            ("kl_k3_rollout_train", "KL(µ‖π) k3 by µ"),
            ("ratio_outside_frac", "tokens with r outside [1/c, c] by µ"),
            ("token_frac", "share of tokens by µ"))],
        "bins")
    trust = _section(
        "Trust region: DRPO gradient weights and the DPPO boundary",
        "DRPO's per-token gradient weight w = 1 − sign(Â(r−1))·|π−µ|/δ (tokens with Â ≠ 0). "
        "With the paper's δ = 12.5 it stays within [0.92, 1.08] (PG-IS with a small tilt); "
        "w < 0 (corrective) needs δ < 1. The boundary fractions show how many tokens mismatch "
        "alone pushes past |π − µ| > δ.",
        [_line(ctx, "mismatch/drpo_weight_mean", "DRPO weight: mean (line), min–max (band)",
               band=("mismatch/drpo_weight_min", "mismatch/drpo_weight_max")),
         _hist(ctx, "mismatch/drpo_weight", "DRPO weight distribution", "w",
               markers=[{"x": 1.0, "label": "w = 1 (PG-IS)"}]),
         _quantile_band(ctx, "mismatch/drpo_weight", "DRPO weight quantiles over steps"),
         _line(ctx, "mismatch/drpo_weight_below_one_frac", "tokens damped by DRPO (w < 1)"),
         _line(ctx, "mismatch/drpo_weight_neg_frac", "corrective tokens (w < 0)"),
         _line(ctx, "mismatch/beyond_dppo_tv_frac", "tokens beyond DPPO-TV δ = 0.15"),
         _line(ctx, "mismatch/beyond_delta_frac", "tokens beyond the configured δ"),
         _line(ctx, "mismatch/dppo_masked_frac", "tokens DPPO-TV would mask")],
        "trust")
    dist = _section(
        "Gap distributions",
        "Per-token distributions from histograms.jsonl: the latest step of each run, and "
        "quantiles over steps (log axes where the gaps span decades).",
        [_hist(ctx, "mismatch/logprob_abs_diff", "|log π − log µ| per token", "|log π − log µ|"),
         _quantile_band(ctx, "mismatch/logprob_abs_diff", "|log π − log µ| quantiles over steps",
                        log=True),
         _hist(ctx, "mismatch/prob_abs_diff", "|π − µ| per token", "|π − µ|",
               markers=[{"x": 0.15, "label": "DPPO-TV δ"}]),
         _hist(ctx, "mismatch/is_ratio", "importance ratio r = π/µ per token", "r",
               markers=[{"x": 1.0, "label": "r = 1"}])],
        "dist")
    splits = _section(
        "Gaps by advantage sign and response position",
        "Positive-advantage tokens are the ones the update pushes up; a one-sided gap biases the "
        "gradient. Position thirds show whether mismatch grows along long responses.",
        [_bars(ctx, "by_adv", ADV_LABELS, "logprob_abs_diff", "mean |log π − log µ| by sign of Â",
               {"pos": "Â > 0", "neg": "Â < 0"}),
         _bars(ctx, "by_adv", ADV_LABELS, "logprob_diff_mean", "mean log π − log µ (signed) by sign of Â",
               {"pos": "Â > 0", "neg": "Â < 0"}),
         _bars(ctx, "by_pos", POSITION_LABELS, "logprob_abs_diff", "mean |log π − log µ| by position"),
         _bars(ctx, "by_pos", POSITION_LABELS, "kl_k3_rollout_train", "KL(µ‖π) k3 by position")],
        "splits")
    moe_bar = ""
    if ctx.any("mismatch/moe/logprob_abs_diff_route_same") or ctx.any("mismatch/moe/logprob_abs_diff_route_diff"):
        groups = []
        for r in runs:
            vals = [_mean(r.window_values(f"mismatch/moe/logprob_abs_diff_route_{s}", window))
                    for s in ("same", "diff")]
            if any(math.isfinite(v) for v in vals):
                groups.append({"run": r.label, "idx": r.idx, "color": r.color, "values": vals})
        moe_bar = svg.bar_chart(chart_id=ctx.cid("moe-gap"), key="mismatch/moe/logprob_abs_diff_route_*",
                                title="mean |log π − log µ|: routing agrees vs differs",
                                subtitle="a large gap means routing disagreement drives mismatch",
                                categories=["routing agrees", "routing differs"], groups=groups)
    layers = _moe_layers(runs)
    moe = _section(
        "MoE routing disagreement",
        "Top-K expert sets chosen by the trainer's router vs the engine's (rollout.routing_replay: "
        "record or replay, which make the engine return its routed experts). Replay (R3) drives "
        "this to zero.",
        [_line(ctx, "mismatch/moe/route_mismatch_frac", "(token, layer) pairs routed differently"),
         _line(ctx, "mismatch/moe/expert_overlap", "expert overlap |S_train ∩ S_rollout| / K"),
         _line(ctx, "mismatch/moe/token_mismatch_frac", "tokens with any routing difference"),
         _bars(ctx, "moe", [f"layer_{i}" for i in layers], "route_mismatch_frac",
               "routing disagreement by layer", {f"layer_{i}": str(i) for i in layers}),
         moe_bar], "moe")

    body = [
        f'<header><h1>{esc(title)}</h1><div class="meta">generated {esc(now)} · '
        f'{len(runs)} run(s) · self-contained, no network needed</div><nav>'
        + "".join(f'<a href="#{s}">{n}</a>' for s, n in (
            ("runs", "runs"), ("mismatch", "mismatch"), ("bins", "by µ"), ("trust", "trust region"),
            ("dist", "distributions"), ("splits", "splits"), ("moe", "MoE"), ("curves", "loss & reward"),
            ("time", "step time"), ("all", "all scalars")))
        + '</nav></header><main>',
        (f'<div class="live">Live: this page checks the run directories every '
         f'{live_interval_s:g} s and reloads when they change.</div>' if live_interval_s else ""),
        '<section id="runs"><h2>Runs</h2>', _runs_table(runs),
        '<h2>Health</h2>', _health_table(runs), '</section>',
        mismatch, bins, trust, dist, splits, moe, _curves_section(ctx), _time_section(ctx),
        _all_scalars(ctx), '</main><div id="tip"></div>',
    ]
    live_attr = (f' data-live-interval="{live_interval_s:g}" data-version="{esc(version)}"'
                 if live_interval_s else "")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
            f"<style>{_CSS}{hide_css}</style></head><body data-runs=\"{len(runs)}\"{live_attr}>"
            + "".join(body) + f"<script>{_JS}</script></body></html>\n")
