"""Building the HTML report (``python -m ssl_lib report page|index|pages``, run by ``make reports``).

:func:`execute_page` runs one notebook with papermill into ``reports/<profile>/<page>.html``
(executed copy under ``notebooks/``, recorded values under ``records/``), writing each file under a
temporary name and renaming it only once the whole page succeeded; a failing cell raises
:class:`PageError` naming the notebook and the cell. :func:`build_index` writes ``index.html`` with
the headline table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import html
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


from .. import experiments as ex
from ..errors import BadInput
from ..files import atomic_write, write_if_changed
from .display import Table, environment_info, finding_table

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
    out["06-tuning"] = ("06-tuning.ipynb", {}, "Tuning: does the k-means term help, at equal tuning effort?")  # tuning
    out["07-protocol"] = ("07-protocol.ipynb", {}, "The FixMatch protocol, with and without the k-means term")
    return out


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

# The pages show figures and tables; each code cell's input is folded into a <details> of its own
# (click "code" to open it), and a button opens or folds them all. The notebooks are unchanged.
_PAGE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{% block input_group -%}
<details class="ssl-code"><summary>code</summary>
{{ super() }}
</details>
{%- endblock input_group %}
"""
_CODE_CSS = """<style>
details.ssl-code > summary { color: #888; font-size: 11px; cursor: pointer; margin: 2px 0 2px 64px; }
button#ssl-code-toggle { position: absolute; top: 8px; right: 12px; z-index: 10; font-size: 12px; }
</style>"""
_CODE_TOGGLE = """<button id="ssl-code-toggle" type="button" onclick="
  const cells = document.querySelectorAll('details.ssl-code'), open = this.textContent === 'show code';
  cells.forEach(d => d.open = open); this.textContent = open ? 'hide code' : 'show code';">show code</button>"""


def render_html(executed: str | Path, out_html: str | Path, title: str) -> None:
    """nbconvert's HTML of an executed notebook (the code folded away, see ``_PAGE_TEMPLATE``),
    written under a temporary name then renamed."""
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(executed), as_version=4)
    exporter = HTMLExporter(extra_loaders=[jinja2.DictLoader({"ssl_page.html.j2": _PAGE_TEMPLATE})],
                            template_file="ssl_page.html.j2")
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title}})
    body = body.replace("</head>", _CSS + _CODE_CSS + "\n</head>", 1)
    body = _insert_after_body_tag(body, _CODE_TOGGLE)
    out_html = Path(out_html)
    atomic_write(out_html, body)


def _insert_after_body_tag(page: str, text: str) -> str:
    start = page.index("<body")
    end = page.index(">", start) + 1
    return page[:end] + "\n" + text + page[end:]


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
        write_if_changed(record, json.dumps(values, indent=1) + "\n")
        render_html(executed, out_dir / f"{page}.html", f"{title} ({profile})")
    finally:
        record_tmp.unlink(missing_ok=True)
    return seconds


# ------------------------------------------------------------------------------------------ index

def _finished(cfgs: dict, root: Path) -> dict:
    """The finished runs among ``cfgs`` (key -> Run)."""
    return {n: ex.load_run(ex.run_dir_for(c, root), n) for n, c in cfgs.items()
            if ex.is_finished(ex.run_dir_for(c, root), c)}


def index_figures(runs: dict, noise_runs: dict) -> str:
    """The index's figures as embedded PNGs (a copied report folder opens offline): accuracy against
    M with the no-label run's feature clustering, ours against the writeup's per run, and the
    label-noise curve of Experiment 3 when its runs exist."""
    from ..experiments import analysis
    from . import plots

    chance = analysis.chance_level(next(iter(runs.values())))
    no_label = [r for r in analysis.feature_clustering_rows(runs) if r["labels"] == 0]
    figs = [(plots.accuracy_against_m(analysis.experiment_1_rows(runs), no_label[0] if no_label else None, chance),
             "Experiment 1: test accuracy against the fraction of unlabeled images"),
            (plots.accuracy_bars(analysis.headline_rows(runs), chance=chance), "Every run: ours beside the writeup's")]
    rows3 = analysis.experiment_3_rows(noise_runs)
    if rows3:
        figs.append((plots.label_noise_curve(rows3, chance=chance), "Experiment 3: accuracy against label noise"))
    return "\n".join(f'<figure style="display:inline-block;margin:0 1em 1em 0"><img src="{plots.to_data_uri(fig)}" '
                     f'alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'
                     for fig, caption in figs)


def build_index(profile: str, out_dir: str | Path, *, runs_dir: str | Path | None = None,
                source: dict | None = None) -> Path:
    """``out_dir/index.html``: every page, the headline table (our eight runs beside the writeup's
    figures), the takeaway verdicts and the provenance of the whole report."""
    from ..experiments import analysis

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
    figures = index_figures(runs, _finished(ex.seeded(prof, source), root))
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
    tuning = records.get("06-tuning", {})  # tuning: the answer, when the 06-tuning page recorded it
    answers = tuning.get("answers", {})
    tuned = (f'<h2>Does the k-means term help at equal tuning effort? (<a href="06-tuning.html">06-tuning</a>)</h2>'
             f'<p><b>{html.escape(answers["kmeans_verdict"])}</b> One pair of {answers["k"]}-trial studies favours '
             f'the k-means side with probability {answers["prob_kmeans_study_wins"]:.2f}.</p>'
             f'{Table(tuning["accuracy"])._repr_html_()}<p>{html.escape(answers["kmeans_untuned_verdict"])}</p>'
             ) if "kmeans_verdict" in answers else ""
    prov_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in prov.items())
    body = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>ssl_lib report ({html.escape(profile)})</title>{_CSS}
<style>body {{ font-family: sans-serif; max-width: 1400px; margin: 2em auto; padding: 0 1em; }}</style>
</head><body>
<h1>Semi-supervised CIFAR-10 with FixMatch and k-means: report ({html.escape(profile)} profile)</h1>
<p>Profile <b>{html.escape(profile)}</b>: {html.escape(prof.description)}. Every number below is read from
the finished runs in <code>{html.escape(str(root))}</code>; writeup figures are those it reports for
CIFAR-10 with its original code. Differences are ours minus the writeup's.</p>
<h2>Figures</h2>
{figures}
<h2>Headline: all eight runs beside the writeup</h2>
{Table(headline, columns, links)._repr_html_()}
{tuned}
<h2>The writeup's takeaways against our runs</h2>
{finding_table(findings)._repr_html_()}
<h2>Pages</h2>
{Table(page_rows, links=page_links)._repr_html_()}
<h2>Provenance</h2>
<table class="ssl-table">{prov_rows}</table>
</body></html>
"""
    out = out_dir / "index.html"
    write_if_changed(out, body)
    return out


# ------------------------------------------------------------------------------------ command line

def main(argv: list[str] | None = None, prog: str = "python -m ssl_lib.report.build") -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["dashboard"]:  # parses its own arguments
        from .dashboard import main as dashboard_main

        return dashboard_main(argv[1:], prog=f"{prog} dashboard")
    parser = argparse.ArgumentParser(prog=prog, description="Build the HTML report.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("pages", help="list the page ids")
    sub.add_parser("dashboard", help="optuna-dashboard on a tuning study (make dashboard STUDY=dir)")
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
    except BadInput as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
