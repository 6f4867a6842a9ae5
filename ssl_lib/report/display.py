"""What the report's notebook pages display: tables without pandas, recorded values, and the
provenance block at the end of every page.

* :class:`Table` - a list of row dicts that displays as an HTML table;
* :class:`Record` - key values a notebook writes to a small JSON (tests and the index read it);
* :func:`provenance` - config, config hash, git commit, package versions, device, data copy and
  wall time.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import yaml

from ..files import jsonable, write_if_changed

def _fmt(value) -> str:
    if value is None:
        return "&mdash;"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "&mdash;"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:.1f}"
    return html.escape(str(value))


def _fmt_signed(value) -> str:
    return "&mdash;" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:+.4f}"


def _is_seconds(column: str) -> bool:
    return "s/epoch" in column or "(s)" in column or "seconds" in column or column.endswith(" s")


class Table:
    """Rows (dicts) shown as an HTML table; columns whose name ends in 'diff' get a sign."""

    def __init__(self, rows: list[dict], columns=None, links: dict | None = None, caption: str = "",
                 common: dict | None = None):
        self.rows = list(rows)
        self.columns = list(columns or (self.rows[0].keys() if self.rows else []))
        self.links = links or {}  # value of the first column -> href
        self.caption = caption
        self.common = common or {}  # what every row shares, said once above the table (split_common)

    def _cell(self, column: str, value) -> str:
        if column.endswith("diff"):
            text = _fmt_signed(value)
        elif isinstance(value, float) and math.isfinite(value) and _is_seconds(column):
            text = f"{value:.1f}"
        else:
            text = _fmt(value)
        href = self.links.get(value) if column == self.columns[0] else None
        return f'<a href="{html.escape(href)}">{text}</a>' if href else text

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{self._cell(c, r.get(c))}</td>" for c in self.columns) + "</tr>"
                       for r in self.rows)
        cap = f"<caption>{html.escape(self.caption)}</caption>" if self.caption else ""
        common = ("<p><b>Every row</b>: " + "; ".join(f"{html.escape(str(c))} <b>{_fmt(v)}</b>"
                                                     for c, v in self.common.items()) + "</p>") if self.common else ""
        return f'{common}<table class="ssl-table">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'

    def __repr__(self) -> str:
        cells = [[str(c) for c in self.columns]] + [[html.unescape(_fmt(r.get(c))) for c in self.columns]
                                                     for r in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.columns))]
        common = ["every row: " + "; ".join(f"{c} {html.unescape(_fmt(v))}" for c, v in self.common.items())]
        return "\n".join(common[:bool(self.common)] + ["  ".join(v.ljust(w) for v, w in zip(row, widths))
                                                        for row in cells])


def split_common(rows: list[dict], keep=()) -> tuple[dict, list[dict]]:
    """The columns whose value is the same in every row (a dict, to be said once: ``Table(...,
    common=...)``) and the rows without them. Columns in ``keep`` stay in the rows all the same; with
    fewer than two rows nothing is common."""
    columns = list(dict.fromkeys(c for r in rows for c in r))
    common = {} if len(rows) < 2 else {c: rows[0].get(c) for c in columns if c not in keep
                                       and all(c in r and r[c] == rows[0][c] for r in rows)}
    return common, [{c: v for c, v in r.items() if c not in common} for r in rows]


class Record:
    """Values a notebook records for tests and the index: ``rec["best_acc"] = 0.51``.

    With a path, the JSON file is rewritten (atomically) on every assignment; with "" it stays in memory.
    """

    def __init__(self, path: str | Path = ""):
        self.path = Path(path) if path else None
        self.values: dict = {}

    def __setitem__(self, key: str, value) -> None:
        self.values[key] = json.loads(json.dumps(value, default=jsonable))
        if self.path is not None:
            write_if_changed(self.path, json.dumps(self.values, indent=1, default=jsonable) + "\n")

    def __getitem__(self, key: str):
        return self.values[key]

    def update(self, **values) -> None:
        for key, value in values.items():
            self[key] = value


class Clock:
    """Wall time since the page started."""

    def __init__(self):
        self.start = time.perf_counter()
        self.started_at = _dt.datetime.now().astimezone().isoformat(timespec="seconds")

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


class HTML:
    def __init__(self, text: str):
        self.text = text

    def _repr_html_(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return html.unescape(self.text)


# ---------------------------------------------------------------------------------- provenance

PACKAGES = ("ssl_lib", "torch", "torchvision", "scikit-learn", "scipy", "numpy", "matplotlib",
            "papermill", "nbconvert", "ipykernel")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def environment_info() -> dict:
    """Where this page runs: git commit, interpreter, packages and, on a page that has used torch,
    the device torch would pick and its threads. A page that only reads saved runs leaves torch
    unloaded (seconds of its kernel's start); the devices its runs trained on are in their summaries."""
    from ..checkout import git_commit

    info = {"git_commit": git_commit(), "python": sys.version.split()[0], "interpreter": sys.executable,
            "platform": platform.platform(), "cpus": os.cpu_count(), "packages": package_versions()}
    if "torch" not in sys.modules:
        return {**info, "torch_threads": None, "device": "none", "device_name": "this page computed nothing with torch"}
    import torch

    from ..engine.env import device_name, resolve_device

    device = resolve_device("auto")
    return {**info, "torch_threads": torch.get_num_threads(), "device": str(device), "device_name": device_name(device)}


def _differing(configs: dict) -> list[str]:
    dicts = [c.to_dict() for c in configs.values()]
    return [k for k in dicts[0] if len({json.dumps(d[k]) for d in dicts}) > 1]


def provenance(clock: Clock, *, profile: str, configs: dict | None = None, runs: dict | None = None,
               data: str | dict | None = None, record: Record | None = None) -> HTML:
    """The provenance block of a page; also stored in ``record["provenance"]`` when given."""
    env = environment_info()
    configs = dict(configs or {})
    runs = dict(runs or {})
    for name, run in runs.items():
        configs.setdefault(name, run.config)
    data_text = data.get("description") if isinstance(data, dict) else data
    if data_text is None and runs:
        data_text = next(iter(runs.values())).summary.get("data")
    train_seconds = sum(r.summary.get("train_seconds") or 0 for r in runs.values())
    info = {
        "profile": profile, "page wall time (s)": round(clock.seconds, 1), "page started": clock.started_at,
        "git commit": env["git_commit"], "device (this page)": f"{env['device']} ({env['device_name']})",
        "interpreter": env["interpreter"], "python": env["python"], "platform": env["platform"],
        "dataset copy": data_text or "(none loaded)",
        "config hash": ", ".join(f"{n}: {c.digest()}" for n, c in configs.items()) or "(none)",
    }
    if runs:
        info["training time of these runs (s)"] = round(train_seconds, 1)
        devices = sorted({f"{r.summary['environment'].get('device')} ({r.summary['environment'].get('device_name')})"
                          for r in runs.values()})
        info["device (training)"] = ", ".join(devices)
        commits = sorted({r.summary["environment"].get("git_commit", "?") for r in runs.values()})
        info["git commit (training)"] = ", ".join(commits)
    if record is not None:
        record["provenance"] = {**info, "packages": env["packages"],
                                "configs": {n: c.to_dict() for n, c in configs.items()},
                                "runs": {n: str(r.run_dir) for n, r in runs.items()}}
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in info.items())
    pkgs = ", ".join(f"{k} {v}" for k, v in env["packages"].items())
    parts = ["<h3>Provenance</h3>", f'<table class="ssl-table">{rows}',
             f"<tr><th>packages</th><td>{html.escape(pkgs)}</td></tr></table>"]
    if runs:
        parts.append(Table([{"run": n, "config hash": r.config.digest(), "run directory": str(r.run_dir),
                             "train s": r.summary.get("train_seconds")} for n, r in runs.items()])._repr_html_())
    if len(configs) > 1:
        varying = _differing(configs)
        parts.append(f"<p>Config fields that differ between these runs: {html.escape(', '.join(varying))}.</p>")
    for name, cfg in configs.items():
        text = html.escape(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        opened = " open" if len(configs) == 1 else ""
        parts.append(f"<details{opened}><summary>config {html.escape(name)} ({cfg.digest()})</summary>"
                     f"<pre>{text}</pre></details>")
    return HTML("\n".join(parts))


def finding_table(findings) -> Table:
    return Table([{"claim": f.claim, "verdict": f.verdict.upper(), "measured": f.measured, "test": f.test}
                  for f in findings])


