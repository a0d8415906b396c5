"""Minimal DOM reader for the report (works on our HTML and on Chromium's --dump-dom)."""

from __future__ import annotations

import json
from html.parser import HTMLParser

VOID = {"meta", "link", "br", "img", "input", "hr", "col", "area", "base", "source", "wbr"}


class Element:
    def __init__(self, tag, attrs, parent):
        self.tag, self.attrs, self.parent = tag, dict(attrs), parent
        self.children: list[Element] = []
        self.text = ""

    @property
    def classes(self):
        return set((self.attrs.get("class") or "").split())

    def ancestor(self, tag=None, attr=None):
        p = self.parent
        while p is not None:
            if (tag is None or p.tag == tag) and (attr is None or attr in p.attrs):
                return p
            p = p.parent
        return None

    def iter(self):
        yield self
        for c in self.children:
            yield from c.iter()

    def find_all(self, tag=None, cls=None, **attrs):
        for e in self.iter():
            if tag and e.tag != tag:
                continue
            if cls and cls not in e.classes:
                continue
            if any(e.attrs.get(k.replace("_", "-")) != v for k, v in attrs.items()):
                continue
            yield e

    def all_text(self):
        return self.text + "".join(c.all_text() for c in self.children)


class _Parser(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Element("#root", {}, None)
        self.cur = self.root

    def handle_starttag(self, tag, attrs):
        e = Element(tag, attrs, self.cur)
        self.cur.children.append(e)
        if tag not in VOID:
            self.cur = e

    def handle_startendtag(self, tag, attrs):
        self.cur.children.append(Element(tag, attrs, self.cur))

    def handle_endtag(self, tag):
        e = self.cur
        while e is not None and e.tag != tag:
            e = e.parent
        if e is not None and e.parent is not None:
            self.cur = e.parent

    def handle_data(self, data):
        self.cur.text += data


def parse(html: str) -> Element:
    p = _Parser()
    p.feed(html)
    return p.root


def line_series(root: Element, key: str) -> dict[str, dict]:
    """run label -> {"points": [[x, y], ...], "attrs": {...}} for the line chart of ``key``."""
    out = {}
    for fig in root.find_all("figure", data_key=key, data_kind="line"):
        for g in fig.find_all("g", cls="series"):
            out[g.attrs["data-run"]] = {"points": json.loads(g.attrs["data-points"]), "attrs": g.attrs}
    return out


def bars(root: Element, key: str) -> dict[tuple[str, str], float]:
    """(run, category) -> value for the bar chart whose figure has data-key ``key``."""
    out = {}
    for fig in root.find_all("figure", data_key=key):
        for r in fig.find_all("rect", cls="bar"):
            out[(r.attrs["data-run"], r.attrs["data-category"])] = float(r.attrs["data-value"])
    return out
