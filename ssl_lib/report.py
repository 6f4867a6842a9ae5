"""The HTML report: notebook pages executed with papermill, rendered with nbconvert, and an index.

Pieces the notebooks use:

* :class:`Table` - a list of row dicts that displays as an HTML table (no pandas needed);
* :class:`Record` - key values a notebook writes to a small JSON (tests and the index read it);
* :func:`provenance` - config, config hash, git commit, package versions, device, data copy and
  wall time, shown at the end of every page.

Pieces ``make reports`` uses (``python -m ssl_lib.report page|index|pages``): :func:`execute_page`
runs one notebook into ``reports/<profile>/<page>.html`` (executed copy under ``notebooks/``,
recorded values under ``records/``), writing each file under a temporary name and renaming it
only once the whole page succeeded; a failing cell raises :class:`PageError` naming the notebook
and the cell. :func:`build_index` writes ``index.html`` with the headline table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import html
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import yaml

from . import experiments as ex

NOTEBOOKS_DIR = ex.project_root() / "notebooks"

def pages(names=ex.EXPERIMENTS) -> dict[str, tuple[str, dict, str]]:
    """Page id -> (notebook, page-specific parameters, title); 03-training has one page per experiment."""
    out = {
        "01-data": ("01-data.ipynb", {"experiment": "exp1-m5000"}, "Data and the labeled/unlabeled split"),
        "02-augmentation": ("02-augmentation.ipynb", {}, "Weak and strong augmentations"),
    }
    for name in names:
        out[f"03-training-{name}"] = ("03-training.ipynb", {"experiment": name}, f"Training: {name}")
    out["04-ablations"] = ("04-ablations.ipynb", {}, "Experiments 1 and 2 side by side")
    out["05-conclusions"] = ("05-conclusions.ipynb", {}, "The writeup's takeaways, checked")
    return out


# ------------------------------------------------------------------------------ notebook helpers

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

    def __init__(self, rows: list[dict], columns=None, links: dict | None = None, caption: str = ""):
        self.rows = list(rows)
        self.columns = list(columns or (self.rows[0].keys() if self.rows else []))
        self.links = links or {}  # value of the first column -> href
        self.caption = caption

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
        return f'<table class="ssl-table">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'

    def __repr__(self) -> str:
        cells = [[str(c) for c in self.columns]] + [[html.unescape(_fmt(r.get(c))) for c in self.columns]
                                                     for r in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.columns))]
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells)


def _jsonable(x):
    import numpy as np

    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "to_dict"):
        return x.to_dict()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


class Record:
    """Values a notebook records for tests and the index: ``rec["best_acc"] = 0.51``.

    With a path, the JSON file is rewritten (atomically) on every assignment; with "" it stays in memory.
    """

    def __init__(self, path: str | Path = ""):
        self.path = Path(path) if path else None
        self.values: dict = {}

    def __setitem__(self, key: str, value) -> None:
        self.values[key] = json.loads(json.dumps(value, default=_jsonable))
        if self.path is not None:
            ex.write_if_changed(self.path, json.dumps(self.values, indent=1, default=_jsonable) + "\n")

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
    """Where this page runs: git commit, interpreter, packages, the device torch would pick."""
    from .train import git_commit, resolve_device

    import torch

    device = resolve_device("auto")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor()
                                                                               or platform.machine())
    return {"git_commit": git_commit(), "python": sys.version.split()[0], "interpreter": sys.executable,
            "platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": str(device), "device_name": name, "packages": package_versions()}


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


# -------------------------------------------------------------------------------- executing pages

class PageError(RuntimeError):
    """A report page failed; the message names the notebook, the cell and the error."""


@contextlib.contextmanager
def current_env_kernel():
    """A kernel spec that starts ``sys.executable`` (this environment), whatever kernels the user
    has installed: a temporary folder is put first on JUPYTER_PATH for the duration."""
    name = "ssl-lib-current-env"
    tmp = Path(tempfile.mkdtemp(prefix="ssl-lib-kernel-"))
    spec_dir = tmp / "kernels" / name
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        # log level ERROR: no warning per page about the kernel's local TCP sockets being unencrypted
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                 "--IPKernelApp.log_level=ERROR"],
        "display_name": f"Python ({sys.executable})", "language": "python"}))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(tmp)] + ([old] if old else []))
    try:
        yield name
    finally:
        if old is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = old
        shutil.rmtree(tmp, ignore_errors=True)


def _failed_cell(notebook: Path, err) -> str:
    """'cell N ("first line")' of the committed notebook for a papermill error (papermill counts cells
    of the executed copy, which has an extra injected-parameters cell)."""
    import nbformat

    source = (err.source or "").strip()
    first = (source.splitlines() or [""])[0][:60]
    cells = nbformat.read(str(notebook), as_version=4).cells
    matches = [i for i, c in enumerate(cells) if c.source.strip() == source]
    if matches:
        return f'cell {matches[0] + 1} ("{first}")'
    return f'cell {err.cell_index + 1} of the executed copy ("{first}")'


def execute_notebook(notebook: str | Path, executed: str | Path, parameters: dict, *, label: str = "") -> float:
    """Run ``notebook`` with papermill into ``executed`` (written under a temporary name, renamed on
    success; a failure leaves ``<executed stem>.failed.ipynb``). Returns the wall time in seconds."""
    import papermill as pm

    notebook, executed = Path(notebook), Path(executed)
    executed.parent.mkdir(parents=True, exist_ok=True)
    tmp = executed.with_name(f".{executed.stem}.{os.getpid()}.tmp.ipynb")
    failed = executed.with_name(f"{executed.stem}.failed.ipynb")
    start = time.perf_counter()
    try:
        with current_env_kernel() as kernel:
            pm.execute_notebook(str(notebook), str(tmp), parameters=parameters, kernel_name=kernel,
                                cwd=str(notebook.parent), progress_bar=False, log_output=False)
    except pm.PapermillExecutionError as err:
        os.replace(tmp, failed)
        executed.unlink(missing_ok=True)  # no copy of an earlier success left beside the failure
        raise PageError(f"{label or notebook}: notebook {notebook} failed in {_failed_cell(notebook, err)}: "
                        f"{err.ename}: {err.evalue}\n  executed copy with the traceback: {failed}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - start
    failed.unlink(missing_ok=True)
    os.replace(tmp, executed)
    return seconds


_CSS = """<style>
table.ssl-table { border-collapse: collapse; font-size: 13px; margin: 0.5em 0 1em 0; }
table.ssl-table th, table.ssl-table td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
table.ssl-table th { background: #f3f3f3; }
table.ssl-table td:first-child, table.ssl-table th:first-child { text-align: left; }
</style>"""


def render_html(executed: str | Path, out_html: str | Path, title: str) -> None:
    """nbconvert's HTML of an executed notebook, written under a temporary name then renamed."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(executed), as_version=4)
    body, _ = HTMLExporter().from_notebook_node(nb, resources={"metadata": {"name": title}})
    body = body.replace("</head>", _CSS + "\n</head>", 1)
    out_html = Path(out_html)
    tmp = out_html.with_name(f".{out_html.name}.{os.getpid()}.tmp")
    tmp.write_text(body, encoding="utf-8")
    os.replace(tmp, out_html)


def page_parameters(profile: str, runs_dir: str | Path | None, source: dict, record_to: Path,
                    extra: dict) -> dict:
    return {"profile": profile, "runs_dir": str(runs_dir or ""), "record_to": str(record_to),
            "dataset": source.get("dataset", ""), "data_root": source.get("data_root", ""),
            "cache_dir": source.get("cache_dir", ""), **extra}


def execute_page(page: str, profile: str, out_dir: str | Path, *, runs_dir: str | Path | None = None,
                 source: dict | None = None, notebooks_dir: str | Path = NOTEBOOKS_DIR) -> float:
    """Execute one report page and render it to ``out_dir/<page>.html`` (the file Make tracks, renamed
    into place last). Returns the page's wall time in seconds."""
    table = pages()
    if page not in table:
        raise PageError(f"unknown page {page!r}; pages: {', '.join(table)}")
    notebook, extra, title = table[page]
    out_dir = Path(out_dir).resolve()  # the kernel runs in the notebooks folder: pass it absolute paths
    runs_dir = Path(runs_dir).expanduser().resolve() if runs_dir else None
    source = ex.data_source() if source is None else source
    record = out_dir / "records" / f"{page}.json"
    record_tmp = record.with_name(f".{page}.{os.getpid()}.tmp.json")
    record.parent.mkdir(parents=True, exist_ok=True)
    executed = out_dir / "notebooks" / f"{page}.ipynb"
    params = page_parameters(profile, runs_dir, source, record_tmp, extra)
    try:
        try:
            seconds = execute_notebook(Path(notebooks_dir) / notebook, executed, params, label=page)
        except PageError:
            for stale in (out_dir / f"{page}.html", record):  # the page of an earlier success is now wrong
                stale.unlink(missing_ok=True)
            raise
        values = json.loads(record_tmp.read_text()) if record_tmp.is_file() else {}
        values["page_wall_seconds"] = seconds
        ex.write_if_changed(record, json.dumps(values, indent=1) + "\n")
        render_html(executed, out_dir / f"{page}.html", f"{title} ({profile})")
    finally:
        record_tmp.unlink(missing_ok=True)
    return seconds


# ------------------------------------------------------------------------------------------ index

def build_index(profile: str, out_dir: str | Path, *, runs_dir: str | Path | None = None,
                source: dict | None = None) -> Path:
    """``out_dir/index.html``: every page, the headline table (our eight runs beside the writeup's
    figures), the takeaway verdicts and the provenance of the whole report."""
    from . import analysis

    out_dir = Path(out_dir)
    prof = ex.load_profile(profile)
    cfgs = ex.grid(prof, source)
    root = ex.runs_root(profile, runs_dir)
    missing = [n for n, c in cfgs.items() if not ex.is_finished(ex.run_dir_for(c, root), c)]
    if missing:
        raise PageError(f"index: no finished run for {', '.join(missing)} under {root}; "
                        f"run `make reports PROFILE={profile}` (it trains them first)")
    runs = {n: ex.load_run(ex.run_dir_for(c, root), n) for n, c in cfgs.items()}
    records = {}
    for page in pages():
        path = out_dir / "records" / f"{page}.json"
        records[page] = json.loads(path.read_text()) if path.is_file() else {}
    data_file = out_dir / ".build" / "data.json"
    data = json.loads(data_file.read_text()) if data_file.is_file() else {}
    env = environment_info()

    headline = analysis.headline_rows(runs)
    columns = ("experiment", "M (writeup)", "M (this run)", "w_labeled", "w_augment", "w_kmeans", "epochs",
               "epochs (writeup)", "best acc", "best acc (writeup)", "best acc diff", "final acc",
               "final acc (writeup)", "final acc diff", "cluster acc", "s/epoch", "s/epoch (writeup)")
    links = {n: f"03-training-{n}.html" for n in runs}
    page_rows = [{"page": p, "title": t, "notebook": f"notebooks/{nb}",
                  "wall time (s)": records[p].get("page_wall_seconds")} for p, (nb, _, t) in pages().items()]
    page_links = {p: f"{p}.html" for p in pages()}
    findings = analysis.takeaways(runs)
    train_s = sum(r.summary.get("train_seconds") or 0 for r in runs.values())
    pages_s = sum(r.get("page_wall_seconds") or 0 for r in records.values())
    prov = {
        "profile": f"{profile}: {prof.description}", "dataset copy": data.get("description")
        or next(iter(runs.values())).summary.get("data"),
        "git commit (index)": env["git_commit"],
        "git commit (training)": ", ".join(sorted({r.summary["environment"].get("git_commit", "?")
                                                  for r in runs.values()})),
        "device (training)": ", ".join(sorted({f"{r.summary['environment'].get('device')} "
                                               f"({r.summary['environment'].get('device_name')})"
                                               for r in runs.values()})),
        "training time, all runs (s)": round(train_s, 1), "page execution time, all pages (s)": round(pages_s, 1),
        "config hashes": ", ".join(f"{n}: {r.config.digest()}" for n, r in runs.items()),
        "packages": ", ".join(f"{k} {v}" for k, v in env["packages"].items()),
        "interpreter": env["interpreter"],
        "generated": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    prov_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in prov.items())
    body = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>ssl_lib report ({html.escape(profile)})</title>{_CSS}
<style>body {{ font-family: sans-serif; max-width: 1400px; margin: 2em auto; padding: 0 1em; }}</style>
</head><body>
<h1>Semi-supervised CIFAR-10 with FixMatch and k-means: report ({html.escape(profile)} profile)</h1>
<p>Profile <b>{html.escape(profile)}</b>: {html.escape(prof.description)}. Every number below is read from
the finished runs in <code>{html.escape(str(root))}</code>; writeup figures are those it reports for
CIFAR-10 with its original code. Differences are ours minus the writeup's.</p>
<h2>Headline: all eight runs beside the writeup</h2>
{Table(headline, columns, links)._repr_html_()}
<h2>The writeup's takeaways against our runs</h2>
{finding_table(findings)._repr_html_()}
<h2>Pages</h2>
{Table(page_rows, links=page_links)._repr_html_()}
<h2>Provenance</h2>
<table class="ssl-table">{prov_rows}</table>
</body></html>
"""
    out = out_dir / "index.html"
    ex.write_if_changed(out, body)
    return out


# ------------------------------------------------------------------------------------ command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssl_lib.report", description="Build the HTML report.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("pages", help="list the page ids")
    for cmd in ("page", "index"):
        p = sub.add_parser(cmd, help="execute and render one page" if cmd == "page" else "write index.html")
        if cmd == "page":
            p.add_argument("page")
        p.add_argument("--profile", required=True)
        p.add_argument("--out", type=Path, help="report folder (default: reports/PROFILE)")
        p.add_argument("--runs", help="runs root (default: $SSL_LIB_RUNS/PROFILE or runs/PROFILE)")
        p.add_argument("--dataset")
        p.add_argument("--data-root")
        p.add_argument("--cache-dir")
    args = parser.parse_args(argv)
    if args.command == "pages":
        print("\n".join(pages()))
        return 0
    source = ex.data_source(args.dataset, args.data_root, args.cache_dir)
    out = args.out or ex.project_root() / "reports" / args.profile
    try:
        if args.command == "page":
            seconds = execute_page(args.page, args.profile, out, runs_dir=args.runs, source=source)
            print(f"{out / (args.page + '.html')}: {seconds:.1f} s", file=sys.stderr)
        else:
            print(build_index(args.profile, out, runs_dir=args.runs, source=source), file=sys.stderr)
    except PageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except ValueError as err:
        if not ex._bad_input(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
