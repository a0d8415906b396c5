"""Tiny inline-SVG chart primitives (no JS needed to draw; the page's own script adds hover).

Every drawn element carries its data so a DOM reader (a test, a scraper) can check it:

* line charts: ``<g class="series" data-run-idx data-run data-key data-points="[[x, y], ...]">``
  with one ``<path>`` (NaN / non-positive-on-log values break the line);
* bands: ``<path class="band">`` inside the series group (``data-band`` holds [x, lo, hi]);
* bar charts: ``<rect class="bar" data-run data-category data-value>``;
* histograms: ``<g class="series hist" data-run data-edges data-counts>``;
* thresholds: ``<g class="threshold" data-value data-kind data-source>``.
"""

from __future__ import annotations

import html
import json
import math
from typing import Iterable, Optional, Sequence

__all__ = [
    "PALETTE",
    "fmt",
    "nice_ticks",
    "line_chart",
    "bar_chart",
    "hist_chart",
    "stacked_bar_chart",
    "sparkline",
]

#: Tableau-10: distinguishable, prints fine, colour-blind friendlier than matplotlib's default.
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
           "#ff9da7", "#9c755f", "#bab0ac")
#: Points per series kept in the page; longer series are bucketed keeping each bucket's min
#: and max, so spikes (what a mismatch dashboard is for) survive downsampling.
MAX_POINTS = 2000
#: Points per sparkline in the all-scalars table (~120 px wide).
SPARK_POINTS = 120
#: Histogram overlays switch to a log density axis when run peaks differ by more than this.
HIST_LOG_Y_RATIO = 20.0

W, H = 480, 250
M_LEFT, M_RIGHT, M_TOP, M_BOTTOM = 62, 14, 12, 34

esc = html.escape


def fmt(v: float, digits: int = 3) -> str:
    """Compact number for labels: 0.0123 -> 0.0123, 1.2e-05, 12.3k."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        m, e = f"{v:.{max(digits - 1, 0)}e}".split("e")
        m = m.rstrip("0").rstrip(".")
        return f"{m}e{int(e)}"
    s = f"{v:.{digits}g}"
    return s


def _num(v: float) -> Optional[float]:
    return float(f"{v:.7g}") if v is not None and math.isfinite(v) else None


def _finite(vals: Iterable[float], log: bool = False) -> list[float]:
    return [v for v in vals if v is not None and math.isfinite(v) and (v > 0 or not log)]


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round ticks (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(0.0 if abs(t) < step * 1e-9 else t)
        t += step
    return ticks


class _Scale:
    def __init__(self, lo: float, hi: float, p0: float, p1: float, log: bool = False):
        self.log = log
        if log:
            lo, hi = math.log10(lo), math.log10(hi)
        if hi == lo:
            pad = abs(lo) * 0.05 or 1.0
            lo, hi = lo - pad, hi + pad
        self.lo, self.hi, self.p0, self.p1 = lo, hi, p0, p1

    def __call__(self, v: float) -> float:
        if self.log:
            v = math.log10(v)
        return self.p0 + (v - self.lo) / (self.hi - self.lo) * (self.p1 - self.p0)

    def ticks(self, n: int = 5) -> list[float]:
        if self.log:
            a, b = math.floor(self.lo), math.ceil(self.hi)
            step = max(1, math.ceil((b - a) / 6))
            mult = (1, 2, 5) if self.hi - self.lo <= 3.2 else (1,)
            return [m * 10.0 ** k for k in range(a, b + 1, step) for m in mult
                    if self.lo - 1e-9 <= k + math.log10(m) <= self.hi + 1e-9]
        return nice_ticks(self.lo, self.hi, n)

    def domain(self) -> tuple[float, float]:
        return (10 ** self.lo, 10 ** self.hi) if self.log else (self.lo, self.hi)


def _auto_log(values: Sequence[float], hint: Optional[bool]) -> bool:
    if hint is not None:  # log only when every value can be drawn on it
        f = _finite(values)
        return bool(hint) and bool(f) and min(f) > 0
    pos = _finite(values)
    return bool(pos) and min(pos) > 0 and max(pos) / min(pos) > 1e3


def _padded(lo: float, hi: float, log: bool) -> tuple[float, float]:
    if log:
        return lo / 1.3, hi * 1.3
    span = hi - lo
    pad = span * 0.06 if span > 0 else (abs(hi) * 0.05 or 1.0)
    return lo - pad, hi + pad


def downsample(xs: Sequence[float], ys: Sequence[float], max_points: int = MAX_POINTS):
    """Bucket to <= max_points keeping min and max of each bucket (in x order); a bucket with
    no finite value keeps one NaN point so the line shows the gap."""
    n = len(xs)
    if n <= max_points:
        return list(xs), list(ys)
    import numpy as np

    nb = max(max_points // 2, 1)
    per = math.ceil(n / nb)
    nb = math.ceil(n / per)
    y = np.full(nb * per, np.nan)
    y[:n] = np.asarray([math.nan if v is None else v for v in ys], dtype=float)
    Y = y.reshape(nb, per)
    fin = np.isfinite(Y)
    imin = np.argmin(np.where(fin, Y, np.inf), axis=1)
    imax = np.argmax(np.where(fin, Y, -np.inf), axis=1)
    lo, hi = np.minimum(imin, imax), np.maximum(imin, imax)
    base = np.arange(nb) * per
    has = fin.any(axis=1)
    idx = []
    for b in range(nb):
        if not has[b]:
            idx.append(int(base[b]))
        else:
            idx.append(int(base[b] + lo[b]))
            if hi[b] != lo[b]:
                idx.append(int(base[b] + hi[b]))
    idx = [i for i in idx if i < n]
    return [xs[i] for i in idx], [float(y[i]) for i in idx]


def _frame(chart_id: str, kind: str, key: str, title: str, subtitle: str, body: str,
           extra_attrs: str = "", width: int = W, height: int = H, note: str = "") -> str:
    sub = f'<div class="sub">{esc(subtitle)}</div>' if subtitle else ""
    nt = f'<div class="note">{esc(note)}</div>' if note else ""
    return (f'<figure class="chart" id="{esc(chart_id)}" data-kind="{kind}" data-key="{esc(key)}">'
            f'<figcaption>{esc(title)}{sub}</figcaption>'
            f'<svg viewBox="0 0 {width} {height}" preserveAspectRatio="xMidYMid meet" '
            f'role="img" aria-label="{esc(title)}" {extra_attrs}>{body}</svg>{nt}</figure>')


def _axes(xs: _Scale, ys: _Scale, x_label: str, y_label: str, width: int, height: int,
          x_ticks: Optional[list[float]] = None, x_fmt=lambda t: fmt(t, 6)) -> str:
    p = []
    x0, x1 = M_LEFT, width - M_RIGHT
    y0, y1 = height - M_BOTTOM, M_TOP
    for t in ys.ticks():
        y = ys(t)
        p.append(f'<line class="grid" x1="{x0}" x2="{x1}" y1="{y:.1f}" y2="{y:.1f}"/>'
                 f'<text class="tick" x="{x0 - 5}" y="{y + 3.5:.1f}" text-anchor="end">{esc(fmt(t, 6))}</text>')
    for t in (x_ticks if x_ticks is not None else xs.ticks(6)):
        x = xs(t)
        p.append(f'<line class="xtick" x1="{x:.1f}" x2="{x:.1f}" y1="{y0}" y2="{y0 + 4}"/>'
                 f'<text class="tick" x="{x:.1f}" y="{y0 + 15}" text-anchor="middle">{esc(x_fmt(t))}</text>')
    p.append(f'<line class="axis" x1="{x0}" x2="{x1}" y1="{y0}" y2="{y0}"/>'
             f'<line class="axis" x1="{x0}" x2="{x0}" y1="{y0}" y2="{y1}"/>')
    if x_label:
        p.append(f'<text class="alabel" x="{(x0 + x1) / 2:.0f}" y="{height - 4}" '
                 f'text-anchor="middle">{esc(x_label)}</text>')
    if y_label:
        p.append(f'<text class="alabel" transform="translate(12,{(y0 + y1) / 2:.0f}) rotate(-90)" '
                 f'text-anchor="middle">{esc(y_label)}</text>')
    return "".join(p)


def _path(points: list[tuple[float, float]]) -> str:
    return "".join(("M" if i == 0 else "L") + f"{x:.1f},{y:.1f}" for i, (x, y) in enumerate(points))


def line_chart(*, chart_id: str, key: str, title: str, series: list[dict], subtitle: str = "",
               thresholds: Sequence = (), log_y: Optional[bool] = None, x_label: str = "step",
               y_label: str = "", markers: Sequence[dict] = (), width: int = W,
               height: int = H) -> str:
    """Lines over steps. ``series``: dicts with ``run``, ``idx`` (run index), ``color``,
    ``xs``, ``ys`` and optionally ``band`` = (xs, lo, hi) drawn as a translucent area and
    ``dash`` (bool). ``thresholds``: objects with value / kind / label / source / direction.
    ``markers``: dicts {x, label, color} drawn as dotted verticals (e.g. resumes)."""
    all_y = [y for s in series for y in s["ys"]]
    for s in series:
        if s.get("band"):
            all_y += list(s["band"][1]) + list(s["band"][2])
    log = _auto_log(all_y, log_y)
    fy = _finite(all_y, log)
    all_x = [x for s in series for x, y in zip(s["xs"], s["ys"])]
    if not fy or not all_x:
        return _frame(chart_id, "line", key, title, subtitle,
                      f'<text class="empty" x="{width / 2}" y="{height / 2}" '
                      f'text-anchor="middle">no data</text>', width=width, height=height)
    lo, hi = min(fy), max(fy)
    # Show a threshold when it does not squash the data (at most doubles the span).
    span = (math.log10(hi) - math.log10(lo)) if log else (hi - lo)
    shown, offscale = [], []
    for t in thresholds:
        v = t.value
        if log and v <= 0:
            continue
        nlo, nhi = min(lo, v), max(hi, v)
        nspan = (math.log10(nhi) - math.log10(nlo)) if log else (nhi - nlo)
        if span == 0 or nspan <= 2 * span:
            shown.append(t)
        elif t.kind != "ideal":
            offscale.append(t)
    for t in shown:
        lo, hi = min(lo, t.value), max(hi, t.value)
    lo, hi = _padded(lo, hi, log)
    floor = min([min(fy)] + [t.value for t in shown])
    if not log and lo < 0 <= floor:
        lo = 0.0  # non-negative data: do not pad below zero
    xmin, xmax = min(all_x), max(all_x)
    if xmin == xmax:
        xmin, xmax = xmin - 1, xmax + 1
    xs = _Scale(xmin, xmax, M_LEFT, width - M_RIGHT)
    ys = _Scale(lo, hi, height - M_BOTTOM, M_TOP, log)
    body = [_axes(xs, ys, x_label, y_label, width, height,
                  x_ticks=[t for t in nice_ticks(xmin, xmax, 6) if t == int(t)] or None)]
    for t in shown:
        y = ys(t.value)
        cls = f"threshold {esc(t.kind)}"
        body.append(f'<g class="{cls}" data-value="{t.value}" data-kind="{esc(t.kind)}" '
                    f'data-source="{esc(t.source)}"><line x1="{M_LEFT}" x2="{width - M_RIGHT}" '
                    f'y1="{y:.1f}" y2="{y:.1f}"/><text x="{width - M_RIGHT - 3}" y="{y - 3:.1f}" '
                    f'text-anchor="end">{esc(t.label)} ({esc(t.source)})</text>'
                    f'<title>{esc(t.kind)}: {esc(t.label)} ({esc(t.source)}) {esc(t.note)}</title></g>')
    for i, t in enumerate(offscale):
        body.append(f'<g class="threshold offscale {esc(t.kind)}" data-value="{t.value}" '
                    f'data-kind="{esc(t.kind)}" data-source="{esc(t.source)}"><text '
                    f'x="{width - M_RIGHT - 3}" y="{M_TOP + 10 + 11 * i}" text-anchor="end">'
                    f'{"▲" if t.value > hi else "▼"} {esc(t.label)} = {esc(fmt(t.value))} '
                    f'off scale ({esc(t.source)})</text></g>')
    for m in markers:
        if xmin <= m["x"] <= xmax:
            x = xs(m["x"])
            body.append(f'<g class="marker" data-x="{m["x"]}"><line x1="{x:.1f}" x2="{x:.1f}" '
                        f'y1="{M_TOP}" y2="{height - M_BOTTOM}" stroke="{m.get("color", "#888")}"/>'
                        f'<title>{esc(m.get("label", ""))}</title></g>')
    for s in series:
        pts_x, pts_y = downsample(s["xs"], s["ys"])
        data = [[x, _num(y)] for x, y in zip(pts_x, pts_y)]
        band = ""
        if s.get("band"):
            bx, blo, bhi = s["band"]
            ok = [(x, a, b) for x, a, b in zip(bx, blo, bhi)
                  if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)
                  and (not log or (a > 0 and b > 0))]
            if ok:
                poly = [(xs(x), ys(b)) for x, a, b in ok] + [(xs(x), ys(a)) for x, a, b in reversed(ok)]
                band = (f'<path class="band" d="{_path(poly)}Z" fill="{s["color"]}" '
                        f'data-band="{esc(json.dumps([[x, _num(a), _num(b)] for x, a, b in ok]))}"/>')
        segs, cur = [], []
        for x, y in zip(pts_x, pts_y):
            if y is None or not math.isfinite(y) or (log and y <= 0):
                if cur:
                    segs.append(cur)
                cur = []
                continue
            cur.append((xs(x), ys(y)))
        if cur:
            segs.append(cur)
        d = "".join(_path(seg) for seg in segs if len(seg) > 1)
        dots = "".join(f'<circle cx="{seg[0][0]:.1f}" cy="{seg[0][1]:.1f}" r="2.5" '
                       f'fill="{s["color"]}"/>' for seg in segs if len(seg) == 1)
        dash = ' stroke-dasharray="5,3"' if s.get("dash") else ""
        body.append(
            f'<g class="series" data-run-idx="{s["idx"]}" data-run="{esc(s["run"])}" '
            f'data-key="{esc(s.get("key", key))}" data-n="{len(s["xs"])}" '
            f'data-points="{esc(json.dumps(data))}">{band}'
            f'<path class="line" d="{d}" stroke="{s["color"]}"{dash}/>{dots}'
            f'<title>{esc(s["run"])}</title></g>')
    extra = (f'data-x0="{xs.lo}" data-x1="{xs.hi}" data-px0="{xs.p0}" data-px1="{xs.p1}" '
             f'data-log="{int(log)}" class="linechart"')
    body.append(f'<line class="hover" x1="-10" x2="-10" y1="{M_TOP}" y2="{height - M_BOTTOM}"/>')
    note = ""
    return _frame(chart_id, "line", key, title, subtitle, "".join(body), extra, width, height, note)


def bar_chart(*, chart_id: str, key: str, title: str, categories: Sequence[str],
              groups: list[dict], subtitle: str = "", log_y: Optional[bool] = None,
              y_label: str = "", thresholds: Sequence = (), width: int = W,
              height: int = H, baseline: float = 0.0) -> str:
    """Grouped bars: one group per category, one bar per run. ``groups``: dicts with ``run``,
    ``idx``, ``color``, ``values`` (one per category; NaN = missing) and optional ``lo`` /
    ``hi`` whiskers. Bars grow from ``baseline`` (e.g. 1 for a metric whose ideal is 1) on a
    linear axis, from the bottom on a log axis."""
    vals = [v for g in groups for v in g["values"]]
    whisk = [v for g in groups for k in ("lo", "hi") for v in (g.get(k) or [])]
    log = _auto_log(vals + whisk, log_y)
    fy = _finite(vals + whisk, log)
    if not fy:
        return _frame(chart_id, "bar", key, title, subtitle,
                      f'<text class="empty" x="{width / 2}" y="{height / 2}" '
                      f'text-anchor="middle">no data</text>', width=width, height=height)
    lo, hi = min(fy), max(fy)
    for t in thresholds:
        if lo <= t.value <= hi * 2 and (t.value > 0 or not log):
            hi = max(hi, t.value)
    if log:
        lo, hi = lo / 1.5, hi * 1.5
    else:
        lo, hi = min(baseline, lo), max(baseline, hi)
        pad = (hi - lo) * 0.08 or 1.0
        lo, hi = (lo if lo == baseline else lo - pad), hi + pad
    ys = _Scale(lo, hi, height - M_BOTTOM, M_TOP, log)
    ncat, nrun = len(categories), max(len(groups), 1)
    x0, x1 = M_LEFT, width - M_RIGHT
    cw = (x1 - x0) / max(ncat, 1)
    bw = cw * 0.8 / nrun
    p = []
    for t in ys.ticks():
        y = ys(t)
        p.append(f'<line class="grid" x1="{x0}" x2="{x1}" y1="{y:.1f}" y2="{y:.1f}"/>'
                 f'<text class="tick" x="{x0 - 5}" y="{y + 3.5:.1f}" text-anchor="end">{esc(fmt(t, 6))}</text>')
    base = ys(lo) if log else ys(baseline)
    for ci, cat in enumerate(categories):
        cx = x0 + cw * ci
        p.append(f'<text class="tick" x="{cx + cw / 2:.1f}" y="{height - M_BOTTOM + 15}" '
                 f'text-anchor="middle">{esc(cat)}</text>')
        for gi, g in enumerate(groups):
            v = g["values"][ci]
            bx = cx + cw * 0.1 + bw * gi
            if v is None or not math.isfinite(v) or (log and v <= 0):
                continue
            y = ys(v)
            top, h = min(y, base), abs(base - y)
            tip = f'{g["run"]} · {cat}: {fmt(v, 4)}'
            wh = ""
            if g.get("lo") and g.get("hi"):
                a, b = g["lo"][ci], g["hi"][ci]
                if a is not None and b is not None and math.isfinite(a) and math.isfinite(b) and \
                        (not log or (a > 0 and b > 0)):
                    xm = bx + bw / 2
                    wh = (f'<line class="whisker" x1="{xm:.1f}" x2="{xm:.1f}" y1="{ys(a):.1f}" '
                          f'y2="{ys(b):.1f}"/>')
                    tip += f" (range over steps {fmt(a, 3)} .. {fmt(b, 3)})"
            p.append(f'<g data-run-idx="{g["idx"]}"><rect class="bar" data-run="{esc(g["run"])}" '
                     f'data-category="{esc(cat)}" data-value="{_num(v)}" x="{bx:.1f}" '
                     f'y="{top:.1f}" width="{max(bw - 1, 1):.1f}" height="{max(h, 0.5):.1f}" '
                     f'fill="{g["color"]}"><title>{esc(tip)}</title></rect>{wh}</g>')
    for t in thresholds:
        if (t.value > 0 or not log) and lo <= t.value <= hi:
            y = ys(t.value)
            p.append(f'<g class="threshold {esc(t.kind)}" data-value="{t.value}" '
                     f'data-kind="{esc(t.kind)}" data-source="{esc(t.source)}"><line x1="{x0}" '
                     f'x2="{x1}" y1="{y:.1f}" y2="{y:.1f}"/><text x="{x1 - 3}" y="{y - 3:.1f}" '
                     f'text-anchor="end">{esc(t.label)} ({esc(t.source)})</text></g>')
    p.append(f'<line class="axis" x1="{x0}" x2="{x1}" y1="{height - M_BOTTOM}" '
             f'y2="{height - M_BOTTOM}"/><line class="axis" x1="{x0}" x2="{x0}" '
             f'y1="{height - M_BOTTOM}" y2="{M_TOP}"/>')
    if y_label:
        p.append(f'<text class="alabel" transform="translate(12,{(height - M_BOTTOM + M_TOP) / 2:.0f}) '
                 f'rotate(-90)" text-anchor="middle">{esc(y_label)}</text>')
    return _frame(chart_id, "bar", key, title, subtitle, "".join(p), "", width, height)


def hist_chart(*, chart_id: str, key: str, title: str, hists: list[dict], subtitle: str = "",
               x_label: str = "", width: int = W, height: int = H,
               markers: Sequence[dict] = ()) -> str:
    """Density step-lines, one per run. ``hists``: dicts with ``run``, ``idx``, ``color``,
    ``step`` and a histogram summary (``edges``, ``counts``, ``scale``, ``n``). Log-binned
    summaries are drawn on a log x axis (density per decade) when every run is log-binned."""
    hs = [h for h in hists if h.get("counts")]
    if not hs:
        return _frame(chart_id, "hist", key, title, subtitle,
                      f'<text class="empty" x="{width / 2}" y="{height / 2}" '
                      f'text-anchor="middle">no histogram data</text>', width=width, height=height)
    log_x = all(h.get("scale") == "log" for h in hs)
    dens = []
    for h in hs:
        e, c = h["edges"], h["counts"]
        tot = sum(c) or 1
        ws = [((math.log10(e[i + 1]) - math.log10(e[i])) if log_x else (e[i + 1] - e[i])) or 1e-300
              for i in range(len(c))]
        dens.append([ci / tot / wi for ci, wi in zip(c, ws)])
    xlo = min(h["edges"][0] for h in hs)
    xhi = max(h["edges"][-1] for h in hs)
    for m in markers:
        if not log_x or m["x"] > 0:
            xlo, xhi = min(xlo, m["x"]), max(xhi, m["x"])
    peaks = [max(d) for d in dens if max(d) > 0] or [1.0]
    ymax = max(peaks)
    # Runs whose peaks differ by > HIST_LOG_Y_RATIO (a BF16 spike next to a wide FP8
    # distribution) share a log density axis so that every run stays visible.
    log_y = ymax / min(peaks) > HIST_LOG_Y_RATIO
    if log_y:
        pos = [v for d in dens for v in d if v > 0]
        floor = max(min(pos), ymax * 1e-4) / 2
        ys = _Scale(floor, ymax * 1.5, height - M_BOTTOM, M_TOP, True)
        clip = lambda v: max(v, floor)  # noqa: E731
    else:
        ys = _Scale(0.0, ymax * 1.08, height - M_BOTTOM, M_TOP)
        clip = lambda v: v  # noqa: E731
    zero = ys.domain()[0] if log_y else 0.0
    xs = _Scale(xlo, xhi, M_LEFT, width - M_RIGHT, log_x)
    body = [_axes(xs, ys, x_label,
                  "density" + (" / decade" if log_x else "") + (" (log)" if log_y else ""),
                  width, height)]
    for m in markers:
        x = xs(m["x"])
        right = x > (M_LEFT + width - M_RIGHT) / 2
        body.append(f'<g class="marker" data-x="{m["x"]}"><line x1="{x:.1f}" x2="{x:.1f}" '
                    f'y1="{M_TOP}" y2="{height - M_BOTTOM}" stroke="#777"/><text '
                    f'x="{x - 3 if right else x + 3:.1f}" y="{M_TOP + 10}" class="tick" '
                    f'text-anchor="{"end" if right else "start"}">{esc(m.get("label", ""))}</text></g>')
    for h, d in zip(hs, dens):
        e = h["edges"]
        pts = [(xs(e[0]), ys(zero))]
        for i, v in enumerate(d):
            pts += [(xs(e[i]), ys(clip(v))), (xs(e[i + 1]), ys(clip(v)))]
        pts.append((xs(e[-1]), ys(zero)))
        body.append(
            f'<g class="series hist" data-run-idx="{h["idx"]}" data-run="{esc(h["run"])}" '
            f'data-key="{esc(key)}" data-step="{h.get("step", "")}" data-n="{h.get("n", sum(h["counts"]))}" '
            f'data-edges="{esc(json.dumps(e))}" data-counts="{esc(json.dumps(h["counts"]))}">'
            f'<path class="line area" d="{_path(pts)}" stroke="{h["color"]}" fill="{h["color"]}"/>'
            f'<title>{esc(h["run"])} step {h.get("step", "")}: n={h.get("n", "")}</title></g>')
    return _frame(chart_id, "hist", key, title, subtitle, "".join(body), "", width, height)


def stacked_bar_chart(*, chart_id: str, key: str, title: str, rows: list[dict],
                      part_names: Sequence[str], part_colors: Sequence[str], subtitle: str = "",
                      unit: str = "s", width: int = W) -> str:
    """Horizontal stacked bars, one row per run. ``rows``: dicts ``run``, ``idx``, ``color``,
    ``parts`` (values aligned with ``part_names``; NaN/None = 0)."""
    row_h, top = 26, 8
    legend_h = 22
    height = top + row_h * max(len(rows), 1) + M_BOTTOM + legend_h
    totals = [sum(v for v in r["parts"] if v is not None and math.isfinite(v)) for r in rows]
    xmax = max(totals + [0.0]) or 1.0
    lab_w = 110
    xs = _Scale(0.0, xmax * 1.05, lab_w, width - M_RIGHT)
    p = []
    y_axis = top + row_h * len(rows)
    for t in nice_ticks(0.0, xmax * 1.05, 5):
        x = xs(t)
        p.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{y_axis}"/>'
                 f'<text class="tick" x="{x:.1f}" y="{y_axis + 14}" text-anchor="middle">'
                 f'{esc(fmt(t, 6))}{esc(unit)}</text>')
    for ri, r in enumerate(rows):
        y = top + row_h * ri + 4
        p.append(f'<g data-run-idx="{r["idx"]}"><rect x="{lab_w - 16}" y="{y + 4}" width="10" '
                 f'height="10" fill="{r["color"]}"/><text class="tick" x="{lab_w - 20}" '
                 f'y="{y + 13}" text-anchor="end">{esc(r["run"][:16])}</text>')
        acc = 0.0
        for name, color, v in zip(part_names, part_colors, r["parts"]):
            if v is None or not math.isfinite(v) or v <= 0:
                continue
            xa, xb = xs(acc), xs(acc + v)
            p.append(f'<rect class="bar stack" data-run="{esc(r["run"])}" data-category="{esc(name)}" '
                     f'data-value="{_num(v)}" x="{xa:.1f}" y="{y}" width="{max(xb - xa, 0.5):.1f}" '
                     f'height="{row_h - 8}" fill="{color}"><title>{esc(r["run"])} {esc(name)}: '
                     f'{esc(fmt(v, 4))}{esc(unit)}</title></rect>')
            acc += v
        p.append("</g>")
    lx = lab_w
    ly = y_axis + 26
    for name, color in zip(part_names, part_colors):
        p.append(f'<rect x="{lx}" y="{ly}" width="10" height="10" fill="{color}"/>'
                 f'<text class="tick" x="{lx + 14}" y="{ly + 9}">{esc(name)}</text>')
        lx += 14 + 7 * len(name) + 16
    return _frame(chart_id, "stacked", key, title, subtitle, "".join(p), "", width, height)


def sparkline(xs: Sequence[float], ys: Sequence[float], color: str, width: int = 120,
              height: int = 22) -> str:
    px, py = downsample(xs, ys, SPARK_POINTS)
    f = [(x, y) for x, y in zip(px, py) if y is not None and math.isfinite(y)]
    if len(f) < 2:
        return ""
    px, py = [a for a, _ in f], [b for _, b in f]
    lo, hi = min(py), max(py)
    sx = _Scale(min(px), max(px), 1, width - 1)
    sy = _Scale(lo, hi, height - 2, 2)
    return (f'<svg class="spark" viewBox="0 0 {width} {height}" width="{width}" height="{height}">'
            f'<path d="{_path([(sx(x), sy(y)) for x, y in zip(px, py)])}" stroke="{color}"/></svg>')
