"""The report notebooks: committed without outputs, and executed with papermill on the smoke profile
(runs and pages in tmp_path) with assertions on the values each page records.

`make test` also runs every notebook on its default parameters with `pytest --nbval-lax notebooks/`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import nbformat
import pytest

from ssl_lib.experiments import analysis
from ssl_lib.report import build as report
from ssl_lib import experiments as ex

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PROVENANCE_KEYS = ("profile", "page wall time (s)", "git commit", "device (this page)", "interpreter",
                   "dataset copy", "config hash", "packages", "configs")


def test_the_seven_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01-data.ipynb", "02-augmentation.ipynb", "03-training.ipynb",
                                           "04-ablations.ipynb", "05-conclusions.ipynb", "06-tuning.ipynb",
                                           "07-protocol.ipynb"]
    assert {nb for nb, _, _ in report.pages().values()} == {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebooks_have_no_outputs_and_a_smoke_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {i + 1} has outputs: run `make clear-outputs`"
            assert cell.execution_count is None, f"{path.name} cell {i + 1} has an execution count"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    namespace: dict = {}
    exec(tagged[0].source, namespace)  # plain assignments only
    assert namespace["profile"] == "smoke" and namespace["record_to"] == "" and namespace["runs_dir"] == ""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, smoke_grid, smoke_pages):
    """The smoke grid and pages (built once per test run) and a report folder for this module."""
    root, runs = smoke_grid
    return {"runs_dir": root, "out": tmp_path_factory.mktemp("smoke-report") / "report", "runs": runs,
            "pages": smoke_pages}


def _page(smoke, page: str, execute: bool = False) -> dict:
    """A page's record after the checks every page passes: executed here, or read from the pages
    built once per test run (conftest.py's smoke_pages)."""
    if execute:
        report.execute_page(page, "smoke", smoke["out"], runs_dir=smoke["runs_dir"], source={})
    else:
        smoke = {**smoke, "out": smoke["pages"]}
    html = (smoke["out"] / f"{page}.html").read_text()
    assert "Provenance" in html and "<img" in html
    executed = nbformat.read(smoke["out"] / "notebooks" / f"{page}.ipynb", as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
    record = json.loads((smoke["out"] / "records" / f"{page}.json").read_text())
    prov = record["provenance"]
    for key in PROVENANCE_KEYS:
        assert key in prov, key
    assert prov["interpreter"] == sys.executable  # papermill used this environment's kernel
    assert record["page_wall_seconds"] > 0
    return record


def test_01_data_records_the_split(smoke):
    rec = _page(smoke, "01-data")
    assert (rec["source"], rec["n_train"], rec["n_test"], len(rec["classes"])) == ("synthetic", 600, 300, 10)
    cfg = ex.resolve("exp1-m5000", "smoke", {})
    assert rec["num_unlabeled"] == cfg.num_unlabeled == 60 and rec["num_labeled"] == 540
    assert sum(r["labeled"] for r in rec["per_class"]) == 540
    assert sum(r["unlabeled"] for r in rec["per_class"]) == 60
    assert [r["M (this profile)"] for r in rec["grid"]] == [0, 1, 60, 480, 600, 240, 240, 240]
    assert rec["provenance"]["dataset copy"].startswith("synthetic")


def test_pages_that_read_saved_runs_leave_torch_unloaded(smoke):
    """Their kernels start without torch's seconds of imports (the page's own device then says so);
    a page that loads images has torch, and says which device it would use."""
    for page in ("03-training-exp1-m0", "04-ablations", "05-conclusions", "06-tuning"):
        assert _page(smoke, page)["provenance"]["device (this page)"] == "none (this page computed nothing with torch)"
    assert _page(smoke, "01-data")["provenance"]["device (this page)"].startswith("cpu (")


def test_02_augmentation_draws_per_image(smoke):
    # conftest.py executed it into a relative report folder, as `make` passes it, although the kernel
    # runs in notebooks/: the page is where the folder is, nothing went to notebooks/<folder>
    rec = _page(smoke, "02-augmentation")
    assert not (ROOT / "notebooks" / smoke["pages"].name).exists()
    assert rec["num_images"] == 3 and rec["image_shape"] == [3, 16, 16]
    assert rec["distinct_strong"] == rec["repeats"] == 8
    assert rec["distinct_weak"] > 1
    low, high = rec["value_range"]
    assert 0.0 <= low <= high <= 1.0


def test_03_training_reports_the_cached_run(smoke):
    rec = _page(smoke, "03-training-exp1-m50000")
    run = smoke["runs"]["exp1-m50000"]
    assert rec["cached"] is True and rec["run_dir"] == str(run.run_dir)
    assert rec["config_digest"] == run.config.digest()
    for key in ("best_acc", "final_acc", "best_epoch", "final_cluster_acc", "num_labeled", "num_unlabeled"):
        assert rec[key] == run.summary[key], key
    assert rec["epochs"] == 2 and rec["iterations"] == 2 * 3
    assert 0.0 <= rec["best_acc"] <= 1.0 and rec["best_acc"] >= rec["final_acc"]
    assert rec["provenance"]["config hash"] == f"exp1-m50000: {run.config.digest()}"
    # the k-means term's last share of the gradient, as the run recorded it
    assert rec["grad_share_kmeans"] == run.summary["grad_share_kmeans"] == run.metrics["epoch"]["grad_share_kmeans"][-1]
    assert 0 < rec["grad_share_kmeans"] <= 1  # all M unlabeled: the k-means term may be the whole gradient


def test_04_ablations_tables_match_the_runs(smoke):
    rec = _page(smoke, "04-ablations")
    rows1, rows2 = rec["experiment_1"], rec["experiment_2"]
    assert [r["experiment"] for r in rows1] == list(ex.EXPERIMENT_1)
    assert [r["experiment"] for r in rows2] == list(ex.EXPERIMENT_2)
    for r in rows1 + rows2:
        s = smoke["runs"][r["experiment"]].summary
        w = ex.WRITEUP[r["experiment"]]
        assert r["best acc"] == s["best_acc"] and r["best acc (writeup)"] == w.best_acc
        assert math.isclose(r["best acc diff"], s["best_acc"] - w.best_acc)
        assert r["final acc (writeup)"] == w.final_acc
    assert [r["M (writeup)"] for r in rows1] == [0, 50, 5000, 40000, 50000]
    assert [r["w_kmeans"] for r in rows2] == [0.025, 0.25, 100.0]
    rows3 = rec["experiment_3"]
    seeded = ex.ensure_seeded("smoke", smoke["runs_dir"], source={})  # trained with the grid (conftest.py)
    assert [(r["label noise"], r["seeds"]) for r in rows3] == [(0.0, 2), (0.2, 2), (0.4, 2), (0.6, 2)]  # smoke: exp3_seeds [0, 1]
    for r in rows3:
        name = f"exp3-noise{r['label noise']:g}"
        ssl = [seeded[name, s].summary for s in (0, 1)]
        assert math.isclose(r["best acc (three losses)"], (ssl[0]["best_acc"] + ssl[1]["best_acc"]) / 2)
        assert r["labels flipped"] == ssl[0]["labels_flipped"] and seeded[name, 0].run_dir == smoke["runs"][name].run_dir
    assert rows3[0]["labels flipped"] == 0 and rows3[-1]["labels flipped"] > 0
    noise = analysis.check_label_noise(seeded)
    assert rec["label_noise_verdict"] == noise.verdict and "over 2 seed(s)" in noise.measured


def test_05_conclusions_verdicts_are_computed(smoke):
    rec = _page(smoke, "05-conclusions")
    expected = analysis.takeaways({n: smoke["runs"][n] for n in ex.EXPERIMENTS})
    assert [v["verdict"] for v in rec["verdicts"]] == [f.verdict for f in expected]
    assert [v["measured"] for v in rec["verdicts"]] == [f.measured for f in expected]
    assert all(v["verdict"] in (analysis.HOLDS, analysis.FAILS, analysis.UNMEASURABLE) for v in rec["verdicts"])
    assert rec["defects"] == len(analysis.DEFECTS)
    assert 0 <= rec["runs_better_than_writeup"] <= 8


def test_index_links_the_pages_that_exist(smoke):
    out = report.build_index("smoke", smoke["out"], runs_dir=smoke["runs_dir"], source={})
    html = out.read_text()
    for name in ex.EXPERIMENTS:
        assert f'href="03-training-{name}.html"' in html and smoke["runs"][name].config.digest() in html


def test_07_protocol_sets_our_runs_beside_the_paper(protocol_smoke_page):
    out, runs_dir = protocol_smoke_page  # executed once per test run (conftest.py; the browser test reads it too)
    rec = json.loads((out / "records" / "07-protocol.json").read_text())
    rows = {(r["run"], r["seed"]): r for r in rec["rows"]}
    assert set(rows) == {("fixmatch-40", 0), ("fixmatch-40", 1), ("fixmatch-kmeans-40", 0), ("fixmatch-kmeans-40", 1),
                         ("supervised-40", 0)}
    assert all(r["labels"] == 40 and r["steps"] == 2 and r["paper (FixMatch RA)"] == 0.8619 for r in rows.values())
    assert all(r["data"].startswith("synthetic") and r["beside the paper"].startswith("no: synthetic") for r in rows.values())
    assert rows[("supervised-40", 0)]["variant"] == "supervised only"
    assert rows[("fixmatch-kmeans-40", 0)]["variant"] == "FixMatch + k-means"
    assert 0 < rows[("fixmatch-kmeans-40", 1)]["k-means share of the gradient (last)"] < 1
    assert rows[("fixmatch-40", 0)]["k-means share of the gradient (last)"] is None
    (diff,) = rec["kmeans_vs_fixmatch"]  # paired by seed: the mean of the two seeds' differences
    per_seed = [rows[("fixmatch-kmeans-40", s)]["median of last 20"] - rows[("fixmatch-40", s)]["median of last 20"]
                for s in (0, 1)]
    assert diff["seeds"] == "0, 1" and diff["difference"] == pytest.approx(sum(per_seed) / 2)
    if diff["95% CI low"] is None:  # two smoke steps: the two seeds' differences may be equal, no spread
        assert per_seed[0] == per_seed[1] and "no spread" in diff["verdict"]
    else:
        assert diff["95% CI low"] <= diff["difference"] <= diff["95% CI high"]
    (twin,) = rec["fixmatch_vs_supervised"]
    assert twin["seeds"] == "0" and twin["95% CI low"] is None  # the twin has one seed: no interval
    assert rec["full_profile_gpu_hours"][-1]["seeds"] == 29 and "estimate" in rec["gpu_seconds_per_step_source"]
    assert {r["labels"] for r in rec["power"]} == {40, 250, 4000}  # the full profile's power, from the paper's spread
    html = (out / "07-protocol.html").read_text()
    assert "Provenance" in html and "How large is the k-means term?" in html
    assert "Main test, pre-registered: 250 labels" in html and "Only the k-means side was tuned" in html
    # what all five runs share is said once above the runs table, not in every row
    assert html.count("synthetic images (checks the plumbing only); ") == 1 and "<b>Every row</b>: labels" in html

    # the quick profile trains nothing of its own: it shows the smoke runs (already trained) as the plumbing
    from ssl_lib.experiments import protocol
    from ssl_lib.experiments.runs import ensure_protocol
    from ssl_lib.files import jsonable

    before = sorted(p.name for p in Path(runs_dir).iterdir())
    quick = ensure_protocol("quick", runs_dir, {})
    assert json.loads(json.dumps(protocol.rows(quick), default=jsonable)) == rec["rows"]
    assert sorted(p.name for p in Path(runs_dir).iterdir()) == before
