"""The experiment grid, profiles, M scaling, run caching, the analysis behind the report pages, the
report builder (tables, records, index, failing pages) and the `make reports` wiring. CPU only."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import yaml

from ssl_lib.experiments import analysis
from ssl_lib.report import build as report
from ssl_lib.report import display
from ssl_lib import experiments as ex
from ssl_lib.config import ConfigError, make_config

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------- the grid

def test_configs_are_the_writeup_grid():
    files = sorted(p.stem for p in (ROOT / "configs").glob("exp*.yaml"))
    assert files == sorted(ex.ALL_EXPERIMENTS)
    keys = None
    for name in ex.ALL_EXPERIMENTS:
        values = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
        keys = keys or set(values)
        assert set(values) == keys, f"{name} sets different keys: a diff would show more than what varies"
        assert values["name"] == name
        assert values["epochs"] == (ex.WRITEUP[name].epochs if name in ex.WRITEUP else 35)
        assert values["label_noise"] == (0.0 if name in ex.WRITEUP else float(name.rsplit("noise", 1)[1]))
    noise = {n: ex.resolve(n, "full") for n in ex.EXPERIMENT_3}
    assert all(c.num_unlabeled == 20000 for c in noise.values())
    assert {(c.w_augment, c.w_kmeans) for n, c in noise.items() if "-sup-" in n} == {(0.0, 0.0)}
    assert {(c.w_augment, c.w_kmeans) for n, c in noise.items() if "-sup-" not in n} == {(0.25, 0.25)}
    m = {n: ex.writeup_m(n) for n in ex.EXPERIMENTS}
    assert [m[n] for n in ex.EXPERIMENT_1] == [0, 50, 5000, 40000, 50000]
    assert {m[n] for n in ex.EXPERIMENT_2} == {20000}
    weights = {n: (ex.resolve(n, "full").w_labeled, ex.resolve(n, "full").w_augment, ex.resolve(n, "full").w_kmeans)
               for n in ex.EXPERIMENTS}
    assert all(weights[n] == (1.0, 0.25, 0.25) for n in ex.EXPERIMENT_1)
    assert [weights[n] for n in ex.EXPERIMENT_2] == [(1.0, 0.25, 0.025), (1.0, 0.25, 0.25), (0.5, 0.125, 100.0)]


def test_writeup_figures_match_the_seed_readme():
    assert ex.WRITEUP["exp1-m5000"] == ex.WriteupFigures(58, 0.5177, 0.5177, 67.2)
    assert ex.WRITEUP["exp1-m50000"].final_acc == 0.1000
    assert [ex.WRITEUP[n].best_acc for n in ex.EXPERIMENT_2] == [0.4567, 0.4577, 0.4754]


@pytest.mark.parametrize("m, n, expected", [
    (0, 600, 0), (50, 600, 1), (5000, 600, 60), (40000, 600, 480), (50000, 600, 600), (20000, 600, 240),
    (50, 5000, 5), (5000, 5000, 500), (50000, 5000, 5000), (50, 50000, 50), (40000, 50000, 40000),
    (49999, 600, 599), (1, 2, 1), (60000, 600, 600),
])
def test_scale_unlabeled_keeps_the_fraction_and_the_ends(m, n, expected):
    assert ex.scale_unlabeled(m, n) == expected


def test_scale_unlabeled_rejects_impossible_requests():
    with pytest.raises(ValueError):
        ex.scale_unlabeled(50, 1)
    with pytest.raises(ValueError):
        ex.scale_unlabeled(-1, 100)


def test_profiles_scale_the_same_grid(monkeypatch):
    for var in ex.DATA_ENV.values():
        monkeypatch.delenv(var, raising=False)
    full, quick, smoke = (ex.grid(p) for p in ("full", "quick", "smoke"))
    for name in ex.EXPERIMENTS:
        assert full[name].epochs == ex.WRITEUP[name].epochs
        assert full[name].num_unlabeled == ex.writeup_m(name)
        assert full[name].dataset == "cifar10" and full[name].train_subset == 0
        assert quick[name].epochs == max(1, round(ex.WRITEUP[name].epochs * 0.15))
        assert quick[name].train_subset == 10000 and quick[name].test_subset == 5000
        assert quick[name].num_unlabeled == ex.scale_unlabeled(ex.writeup_m(name), 10000)
        assert smoke[name].dataset == "synthetic" and smoke[name].epochs == 2
        assert smoke[name].num_unlabeled == ex.scale_unlabeled(ex.writeup_m(name), smoke[name].synthetic_train)
        # what an experiment varies is the same under every profile
        for field in ("w_labeled", "w_augment", "w_kmeans", "name"):
            assert getattr(full[name], field) == getattr(quick[name], field) == getattr(smoke[name], field)
    digests = {c.digest() for c in smoke.values()}
    assert len(digests) == len(ex.EXPERIMENTS)


def test_data_source_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("SSL_LIB_DATASET", "imagefolder")
    monkeypatch.setenv("SSL_LIB_DATA_ROOT", str(tmp_path / "env-root"))
    monkeypatch.delenv("SSL_LIB_CACHE_DIR", raising=False)
    assert ex.data_source() == {"dataset": "imagefolder", "data_root": str(tmp_path / "env-root")}
    assert ex.data_source("cifar10", "x")["dataset"] == "cifar10"  # arguments beat the environment
    quick = ex.resolve("exp1-m50", "quick")
    assert quick.dataset == "imagefolder" and quick.data_root == str(tmp_path / "env-root")
    assert ex.resolve("exp1-m50", "smoke").dataset == "synthetic"  # the smoke profile pins its data
    rel = ex.resolve("exp1-m50", "quick", {"dataset": "imagefolder", "data_root": "some/dir"})
    assert rel.data_root == str(ROOT / "some" / "dir")  # relative to the project, not the cwd
    home = ex.resolve("exp1-m50", "quick", {"dataset": "imagefolder", "data_root": "~/x"})
    assert home.data_root == str(Path.home() / "x")


def test_runs_root(monkeypatch, tmp_path):
    monkeypatch.delenv(ex.RUNS_ENV, raising=False)
    assert ex.runs_root("quick") == ROOT / "runs" / "quick"
    monkeypatch.setenv(ex.RUNS_ENV, "elsewhere")  # relative to the project, wherever the kernel runs
    monkeypatch.chdir(tmp_path)
    assert ex.runs_root("quick") == ROOT / "elsewhere" / "quick"
    assert ex.runs_root("quick", "mine") == tmp_path / "mine"  # an explicit folder is taken as given


def _configs_copy(tmp_path: Path, profiles: dict[str, str]) -> Path:
    root = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", root)
    for name, text in profiles.items():
        (root / "profiles" / f"{name}.yaml").write_text(text)
    return root


@pytest.mark.parametrize("text, message", [
    ("set: {w_kmean: 1}\n", "did you mean 'w_kmeans'"),
    ("epochs: 2\nepochs_scale: 0.5\n", "not both"),
    ("epoch: 2\n", "unknown profile key"),
    ("epochs: 0\n", "epochs must be"),
    ("set: {tau: 2}\n", "tau"),
    ("epochs: 1\ntune_trials: 0\n", "tune_trials must be an integer >= 1"),
    ("epochs: 1\ntune_trials: 2.5\n", "tune_trials must be an integer >= 1"),
    ("epochs: 1\ntune_epochs: 0\n", "tune_epochs must be an integer >= 1, got 0"),
    ("epochs: 1\ntune_epochs: true\n", "tune_epochs must be an integer >= 1"),
])
def test_bad_profiles_are_rejected_by_name(tmp_path, monkeypatch, text, message):
    monkeypatch.setenv(ex.CONFIGS_ENV, str(_configs_copy(tmp_path, {"bad": text})))
    with pytest.raises(ConfigError, match=message):
        ex.load_profile("bad")
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        ex.load_profile("nope")


TINY = """description: tiny test profile
epochs: 1
set: {dataset: synthetic, synthetic_train: 80, synthetic_test: 40, max_iters_per_epoch: 2, kmeans_n_init: 1,
      batch_size: 16, unlabeled_batch_size: 16}
"""


def test_runs_are_cached_by_config_hash(tmp_path, monkeypatch):
    monkeypatch.setenv(ex.CONFIGS_ENV, str(_configs_copy(tmp_path, {"tiny": TINY})))
    cfg = ex.resolve("exp1-m5000", "tiny")
    root = tmp_path / "runs"
    run = ex.ensure_run(cfg, root)
    assert run.run_dir == root / f"exp1-m5000-{cfg.digest()}"
    assert ex.is_finished(run.run_dir, cfg) and run.summary["config_digest"] == cfg.digest()
    assert len(run.iteration("loss_total")) == 2 and len(run.epoch("test_acc")) == 1

    import ssl_lib.engine.train

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(ssl_lib.engine.train, "train", no_training)
    again = ex.ensure_run(cfg, root)
    assert again.summary == run.summary
    other = make_config(cfg.to_dict(), {"seed": 1})
    assert not ex.is_finished(ex.run_dir_for(other, root), other)


def test_cli_train_writes_a_pointer_only_when_it_changes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ex.CONFIGS_ENV, str(_configs_copy(tmp_path, {"tiny": TINY})))
    pointer = tmp_path / "p" / "exp1-m0.run.json"
    runs = str(tmp_path / "runs")
    assert ex.main(["train", "tiny", "exp1-m0", "--runs", runs, "--pointer", str(pointer)]) == 0
    first = pointer.stat().st_mtime_ns
    info = json.loads(pointer.read_text())
    assert info["experiment"] == "exp1-m0" and Path(info["run_dir"]).is_dir()
    assert ex.main(["train", "tiny", "exp1-m0", "--runs", runs, "--pointer", str(pointer)]) == 0
    assert pointer.stat().st_mtime_ns == first  # nothing retrained, nothing rewritten: Make sees no change
    assert "cached" in capsys.readouterr().err
    assert ex.main(["train", "tiny", "nope", "--runs", runs]) == 2
    assert "no experiment config" in capsys.readouterr().err


def test_cli_trains_several_experiments_with_a_pointer_each(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ex.CONFIGS_ENV, str(_configs_copy(tmp_path, {"tiny": TINY})))
    pointers, runs = tmp_path / "p", str(tmp_path / "runs")
    args = ["train", "tiny", "exp1-m0", "exp1-m50", "exp1-m0", "--runs", runs, "--pointer-dir", str(pointers)]
    assert ex.main(args) == 0
    assert capsys.readouterr().err.count("trained in") == 2  # the repeated experiment trained once
    info = {p.name: json.loads(p.read_text()) for p in pointers.iterdir()}
    assert sorted(info) == ["exp1-m0.run.json", "exp1-m50.run.json"]
    assert info["exp1-m50.run.json"]["experiment"] == "exp1-m50"
    assert Path(info["exp1-m50.run.json"]["run_dir"]).name.startswith("exp1-m50-")
    stamps = {p: p.stat().st_mtime_ns for p in pointers.iterdir()}
    assert ex.main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in pointers.iterdir()} == stamps  # Make sees no change
    assert "trained in" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------ analysis

def _run(name: str, *, m: int = 100, labeled: int = 100, w=(1.0, 0.25, 0.25), acc=(0.3, 0.5), loss_aug=None,
         loss_kmeans=None, test_loss=(2.0, 1.5), n_test: int = 1000, classes: int = 10, seed: int = 0) -> ex.Run:
    cfg = make_config({"name": name, "num_unlabeled": m, "w_labeled": w[0], "w_augment": w[1], "w_kmeans": w[2],
                       "dataset": "synthetic", "epochs": len(acc), "seed": seed})
    n_iter = 40
    conf = np.zeros((classes, classes), dtype=int)
    conf[0, 0] = n_test
    best = int(np.argmax(acc))
    summary = {"name": name, "config_digest": cfg.digest(), "epochs": len(acc), "num_labeled": labeled,
               "num_unlabeled": m, "num_classes": classes, "classes": [f"c{i}" for i in range(classes)],
               "data": "synthetic test data", "best_acc": acc[best], "best_epoch": best + 1, "final_acc": acc[-1],
               "final_cluster_acc": acc[-1], "final_test_loss": test_loss[-1], "seconds_per_epoch": 1.0,
               "images_per_sec": 100.0, "train_seconds": 2.0, "confusion": conf.tolist(),
               "environment": {"device": "cpu", "device_name": "test", "git_commit": "abc"}}
    iteration = {"loss_aug": list(loss_aug if loss_aug is not None else np.zeros(n_iter)),
                 "loss_kmeans": list(loss_kmeans if loss_kmeans is not None else np.ones(n_iter)),
                 "loss_total": [1.0] * n_iter}
    epoch = {"test_acc": list(acc), "test_loss": list(test_loss), "seconds": [1.0] * len(acc)}
    return ex.Run(name, cfg, Path("/nonexistent") / name, summary, {"iteration": iteration, "epoch": epoch})


def _grid(**over) -> dict[str, ex.Run]:
    """A grid on which every takeaway holds; ``over`` replaces runs."""
    up, down = np.linspace(0.1, 0.5, 40), np.linspace(0.5, 0.1, 40)
    runs = {
        "exp1-m0": _run("exp1-m0", m=0, labeled=200),
        "exp1-m50": _run("exp1-m50", m=1, labeled=199, loss_aug=up),
        "exp1-m5000": _run("exp1-m5000", m=20, labeled=180, loss_aug=up),
        "exp1-m40000": _run("exp1-m40000", m=160, labeled=40, loss_aug=down),
        "exp1-m50000": _run("exp1-m50000", m=200, labeled=0, acc=(0.1, 0.1), loss_aug=down),
        "exp2-wk0.025": _run("exp2-wk0.025", m=80, w=(1, 0.25, 0.025), loss_kmeans=np.linspace(1, 5, 40)),
        "exp2-wk0.25": _run("exp2-wk0.25", m=80, w=(1, 0.25, 0.25), loss_kmeans=np.linspace(1, 3, 40)),
        "exp2-wk100": _run("exp2-wk100", m=80, w=(0.5, 0.125, 100), loss_kmeans=np.r_[np.linspace(1, 0.1, 10),
                                                                                    np.full(30, 0.1)]),
    }
    runs.update(over)
    return runs


def test_takeaways_hold_on_a_grid_built_to_satisfy_them():
    findings = analysis.takeaways(_grid())
    assert [f.verdict for f in findings] == [analysis.HOLDS] * 4
    assert "7/7 runs with labels beat chance" in findings[0].measured
    assert [r["direction"] for r in findings[1].rows] == ["up", "up", "down", "down"]
    drifts = [r["late drift"] for r in findings[2].rows]
    assert drifts == sorted(drifts, reverse=True)


def test_each_takeaway_can_fail():
    chance_fail = _grid(**{"exp1-m50": _run("exp1-m50", m=1, labeled=199, acc=(0.1, 0.11))})
    assert analysis.check_above_chance(chance_fail).verdict == analysis.FAILS
    unlabeled_good = _grid(**{"exp1-m50000": _run("exp1-m50000", m=200, labeled=0, acc=(0.1, 0.3))})
    assert analysis.check_above_chance(unlabeled_good).verdict == analysis.FAILS
    same_direction = _grid(**{"exp1-m50000": _run("exp1-m50000", m=200, labeled=0, acc=(0.1, 0.1),
                                                  loss_aug=np.linspace(0.1, 0.5, 40))})
    assert analysis.check_augment_direction(same_direction).verdict == analysis.FAILS
    no_pseudo_labels = {n: r for n, r in _grid().items() if n in ex.EXPERIMENT_2 or r.config.num_unlabeled == 0}
    no_pseudo_labels.update({n: _run(n, m=10) for n in ("exp1-m50", "exp1-m5000")})
    assert analysis.check_augment_direction(no_pseudo_labels).verdict == analysis.UNMEASURABLE
    steep = _grid(**{"exp2-wk100": _run("exp2-wk100", m=80, w=(0.5, 0.125, 100), loss_kmeans=np.linspace(1, 9, 40))})
    assert analysis.check_kmeans_flattening(steep).verdict == analysis.FAILS
    converged = {n: _run(n, acc=(0.5, 0.4), test_loss=(1.0, 1.2)) for n in ex.EXPERIMENTS}
    assert analysis.check_not_converged(converged).verdict == analysis.FAILS


def test_above_chance_uses_a_binomial_margin():
    assert analysis.above_chance(0.2, 1000, 10)
    assert not analysis.above_chance(0.11, 1000, 10)  # 3 s.e. of 1,000 guesses at 10% is 0.028
    assert analysis.above_chance(0.11, 1_000_000, 10)


def test_headline_rows_put_the_writeup_beside_ours():
    rows = {r["experiment"]: r for r in analysis.headline_rows(_grid())}
    r = rows["exp1-m5000"]
    assert r["best acc (writeup)"] == 0.5177 and r["M (writeup)"] == 5000 and r["M (this run)"] == 20
    assert math.isclose(r["best acc diff"], 0.5 - 0.5177)
    assert [x["experiment"] for x in analysis.experiment_1_rows(_grid())] == list(ex.EXPERIMENT_1)
    assert [x["w_kmeans"] for x in analysis.experiment_2_rows(_grid())] == [0.025, 0.25, 100.0]


def test_quarter_means_and_drift():
    assert analysis.quarter_means([1, 1, 2, 2, 3, 3, 4, 4]) == [1, 2, 3, 4]
    assert analysis.trend([1, 1, 2, 2, 3, 3, 4, 4]) == 3
    assert math.isnan(analysis.late_drift([0, 0, 0, 0]))
    assert math.isclose(analysis.late_drift([2, 2, 1, 1, 1, 1, 0, 0]), 0.5)


#: The seed README (the project brief's ../shared/seed/README.md, which a clone does not have) as this
#: test needs it, without copying its prose: the hashes of its 8-word windows (see _windows).
SEED_README_WINDOWS = ROOT / "tests" / "data" / "seed-readme-8-word-windows.txt"


def _windows(text: str, n: int = 8) -> set[str]:
    """A text's n-word windows (lower-case words of letters and digits), each as 12 hex digits of its SHA-256."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return {hashlib.sha256(" ".join(words[i:i + n]).encode()).hexdigest()[:12] for i in range(len(words) - n + 1)}


def test_defects_cover_the_seed_readme_list_in_our_own_words_with_the_writeups_figures():
    # the README's eight defects of the writeup's code, in its order
    assert [d[0] for d in analysis.DEFECTS] == ["Device", "Parameter updates", "Stale gradients", "Pseudo-labels",
                                                "Augmentations", "K-means loss memory", "Evaluation", "Reproducibility"]
    text = " ".join(" ".join(d) for d in analysis.DEFECTS)
    # the writeup's figures they quote are the package's record of them (grid.WRITEUP)
    w = ex.WRITEUP
    assert f"a {w['exp1-m0'].epochs}-epoch run made about {w['exp1-m0'].epochs} updates" in text
    assert f"({w['exp1-m50000'].seconds_per_epoch:.0f} s at M={ex.resolve('exp1-m50000', 'full').num_unlabeled})" in text
    trained = [f.final_acc for name, f in w.items() if name != "exp1-m50000"]  # M=50000 collapsed to chance
    assert "stop near 45%" in text and abs(sorted(trained)[len(trained) // 2] - 0.45) < 0.02
    # in our own words: no 8-word window of the README's text
    stored = {line for line in SEED_README_WINDOWS.read_text().splitlines() if not line.startswith("#")}
    assert len(stored) > 400
    assert not [d[0] for d in analysis.DEFECTS if _windows(" ".join(d)) & stored]  # rows repeating 8 words of it
    readme = ROOT.parent / "shared" / "seed" / "README.md"
    if readme.is_file():  # beside the project's checkout (CI has it): the stored windows are the README's
        assert _windows(readme.read_text()) == stored, f"regenerate {SEED_README_WINDOWS.name} (see its first line)"


# -------------------------------------------------------------------------------------- report

def test_table_formats_diffs_seconds_and_links():
    t = display.Table([{"experiment": "a", "best acc": 0.51234, "best acc diff": 0.01, "s/epoch": 12.345,
                       "x": None, "ok": True}], links={"a": "a.html"})
    html = t._repr_html_()
    assert '<a href="a.html">a</a>' in html and "0.5123" in html and "+0.0100" in html and "12.3" in html
    assert "&mdash;" in html and "yes" in html
    assert "best acc" in repr(t)


def test_what_every_row_shares_is_said_once_above_the_table():
    rows = [{"run": "a", "seed": 0, "data": "synthetic", "steps": 2, "acc": 0.1},
            {"run": "b", "seed": 0, "data": "synthetic", "steps": 3, "acc": 0.1}]
    common, per_run = display.split_common(rows, keep=("run", "acc"))
    assert common == {"seed": 0, "data": "synthetic"}  # acc is the same too, but kept in the rows
    assert per_run == [{"run": "a", "steps": 2, "acc": 0.1}, {"run": "b", "steps": 3, "acc": 0.1}]
    t = display.Table(per_run, common=common)
    assert t._repr_html_().startswith("<p><b>Every row</b>: seed <b>0</b>; data <b>synthetic</b></p><table")
    assert "<th>data</th>" not in t._repr_html_() and repr(t).startswith("every row: seed 0; data synthetic\nrun")
    assert display.split_common(rows[:1]) == ({}, rows[:1])  # one row: nothing is common to several
    assert display.split_common([{"a": 1}, {"a": 1, "b": 2}]) == ({"a": 1}, [{}, {"b": 2}])  # b: not in every row


def test_record_writes_json(tmp_path):
    rec = display.Record(tmp_path / "r.json")
    rec["a"] = np.float32(0.5)
    rec.update(b=[1, 2], c=np.arange(2))
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 0.5, "b": [1, 2], "c": [0, 1]}
    mem = display.Record("")
    mem["x"] = 1
    assert mem["x"] == 1


def _write_fake_run(root: Path, run: ex.Run) -> None:
    d = ex.run_dir_for(run.config, root)
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(run.config.to_dict()))
    (d / "metrics.json").write_text(json.dumps(run.metrics))
    (d / "summary.json").write_text(json.dumps({**run.summary, "config_digest": run.config.digest()}))


def test_index_shows_every_run_beside_the_writeup(tmp_path, monkeypatch):
    for var in ex.DATA_ENV.values():
        monkeypatch.delenv(var, raising=False)
    runs_root = tmp_path / "runs"
    for name, cfg in ex.grid("smoke").items():
        fake = _grid()[name]
        _write_fake_run(runs_root, ex.Run(name, cfg, Path(), fake.summary, fake.metrics))
    out = report.build_index("smoke", tmp_path / "report", runs_dir=runs_root)
    html = out.read_text()
    for name in ex.EXPERIMENTS:
        assert f'href="03-training-{name}.html"' in html
    for page in report.pages():
        assert f'href="{page}.html"' in html
    for w in ex.WRITEUP.values():
        assert f"{w.best_acc:.4f}".rstrip("0") in html
    assert "Provenance" in html and "git commit" in html and "config hashes" in html
    shutil.rmtree(ex.run_dir_for(ex.resolve("exp1-m0", "smoke"), runs_root))
    with pytest.raises(report.PageError, match="no finished run for exp1-m0"):
        report.build_index("smoke", tmp_path / "report", runs_dir=runs_root)


def test_a_failing_cell_is_named_and_leaves_no_page(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell('profile = "smoke"\nrecord_to = ""', metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("from ssl_lib.report import display\nrec = display.Record(record_to)\nrec['a'] = 1"),
                nbformat.v4.new_markdown_cell("text"),
                nbformat.v4.new_code_cell("raise ValueError('broken on purpose')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    nbformat.write(nb, nbdir / "02-augmentation.ipynb")
    out = tmp_path / "out"
    with pytest.raises(report.PageError) as err:
        report.execute_page("02-augmentation", "smoke", out, notebooks_dir=nbdir, source={})
    message = str(err.value)
    assert "02-augmentation.ipynb" in message and "cell 4" in message and "broken on purpose" in message
    assert not (out / "02-augmentation.html").exists()
    assert not (out / "notebooks" / "02-augmentation.ipynb").exists()
    assert not (out / "records" / "02-augmentation.json").exists()
    assert (out / "notebooks" / "02-augmentation.failed.ipynb").is_file()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


# ------------------------------------------------------------------------------------ Makefile

def _make(*args: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    done = subprocess.run(["make", "-C", str(ROOT), *args, f"PYTHON={sys.executable}"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_make_reports_plans_every_page_and_the_index():
    # -B: the plan from nothing, whatever reports/smoke/ this checkout already holds
    plan = _make("-n", "-B", "reports", "PROFILE=smoke", "DATASET=imagefolder", "DATA_ROOT=/nowhere", "RUNS=/tmp/r")
    for page in report.pages():
        assert f"ssl_lib report page {page} --profile smoke" in plan
    # one command for the whole grid (one start-up, then the executor's slots), one pointer each
    train = [line for line in plan.splitlines() if "ssl_lib experiments train smoke" in line]
    assert len(train) == 1 and train[0].endswith("--pointer-dir reports/smoke/.build")
    assert set(ex.ALL_EXPERIMENTS) <= set(train[0].split())
    assert "ssl_lib report index --profile smoke" in plan
    helptext = _make("help")
    for target in ("reports", "kernel", "test", "clear-outputs"):
        assert f"  {target} " in helptext


def test_per_run_and_grid_comparisons_with_the_writeup():
    runs = _grid()
    rows = {r["figure"]: r for r in analysis.run_vs_writeup(runs["exp1-m50"])}
    assert rows["best test accuracy"]["writeup"] == 0.4504
    assert math.isclose(rows["final test accuracy"]["diff"], 0.5 - 0.4479)
    custom = ex.Run("custom", runs["exp1-m50"].config, Path(), runs["exp1-m50"].summary, runs["exp1-m50"].metrics)
    assert analysis.run_vs_writeup(custom)[0]["writeup"] is None  # no writeup figure: no difference either
    cmp = analysis.compare_to_writeup(runs)
    assert cmp["runs"] == 8 and cmp["better"] == 6  # 0.5 beats every writeup figure but M=5000's (0.5177); 0.1 < 0.1003
    m = analysis.m_rows(ex.grid("smoke", {}), 600)
    assert [r["M (this profile)"] for r in m] == [0, 1, 60, 480, 600, 240, 240, 240]
    assert m[4]["labeled"] == 0 and m[0]["unlabeled fraction"] == 0


def test_experiment_3_rows_and_the_label_noise_verdict_against_the_seed_spread():
    def pair(noise, ssl, sup, seed=0):
        return {(f"exp3-noise{noise:g}", seed): _run(f"exp3-noise{noise:g}", m=80, acc=(ssl,), seed=seed),
                (f"exp3-sup-noise{noise:g}", seed): _run(f"exp3-sup-noise{noise:g}", m=80, w=(1, 0, 0), acc=(sup,), seed=seed)}

    # seed by seed, the three losses lose 0.08, 0.10, 0.06 and the supervised loss 0.28, 0.25, 0.30:
    # differences 0.20, 0.15, 0.24, mean 0.19667, sd 0.04509, t = 7.554 on 2 df, p = 0.0171
    robust = {**pair(0.0, 0.60, 0.58), **pair(0.2, 0.57, 0.50), **pair(0.4, 0.55, 0.40), **pair(0.6, 0.52, 0.30),
              **pair(0.0, 0.62, 0.57, 1), **pair(0.6, 0.52, 0.32, 1), **pair(0.0, 0.58, 0.60, 2), **pair(0.6, 0.52, 0.30, 2)}
    rows = analysis.experiment_3_rows(robust)
    assert [(r["label noise"], r["seeds"]) for r in rows] == [(0.0, 3), (0.2, 1), (0.4, 1), (0.6, 3)]
    assert rows[0]["best acc (three losses)"] == pytest.approx(0.60) and rows[0]["sd (three losses)"] == pytest.approx(0.02)
    assert rows[1]["sd (three losses)"] is None and rows[3]["gain diff"] == pytest.approx(0.52 - 0.30667, abs=1e-5)
    finding = analysis.check_label_noise(robust)
    assert finding.verdict == analysis.HOLDS and "over 3 seed(s)" in finding.measured
    assert "difference +0.197 (95% CI" in finding.measured and "p = 0.0171" in finding.measured
    # the same drops on two seeds but one seed going the other way: within the seed spread
    noisy = {**pair(0.0, 0.60, 0.58), **pair(0.6, 0.52, 0.30), **pair(0.0, 0.60, 0.58, 1), **pair(0.6, 0.30, 0.40, 1)}
    assert analysis.check_label_noise(noisy).verdict == analysis.FAILS
    one_seed = analysis.check_label_noise({**pair(0.0, 0.60, 0.58), **pair(0.6, 0.52, 0.30)})
    assert one_seed.verdict == analysis.UNMEASURABLE and "cannot be told from the seed spread" in one_seed.measured
    assert analysis.check_label_noise(pair(0.0, 0.6, 0.5)).verdict == analysis.UNMEASURABLE
    # the grid's {name: Run} (seed 0 alone) reads the same
    grid_like = {name: run for (name, _), run in pair(0.0, 0.6, 0.5).items()}
    assert analysis.experiment_3_rows(grid_like)[0]["seeds"] == 1


def test_experiment_3_trains_each_noise_level_over_the_profiles_seeds():
    cfgs = ex.seeded("full", {})
    assert sorted({seed for _, seed in cfgs}) == [0, 1, 2] and len(cfgs) == 3 * len(ex.EXPERIMENT_3)
    assert cfgs["exp3-noise0.2", 0] == ex.resolve("exp3-noise0.2", "full", {})  # seed 0 is the grid's own run
    assert cfgs["exp3-noise0.2", 2].seed == 2 and cfgs["exp3-noise0.2", 2].label_noise == 0.2
    # quick: seed 0 alone (its time budget), smoke: two seeds (the page's verdict computed over seeds)
    assert sorted(ex.seeded("quick", {})) == sorted((n, 0) for n in ex.EXPERIMENT_3)
    assert [s for (n, s) in ex.seeded("smoke", {}) if n == "exp3-noise0"] == [0, 1]


def test_feature_clustering_rows_show_the_random_network_floor():
    run = _run("exp1-m50000", m=200, labeled=0, acc=(0.1,))
    run.summary.update(feature_cluster_acc=0.31, feature_cluster_acc_random_net=0.22)
    (row,) = analysis.feature_clustering_rows({"exp1-m50000": run})
    assert row["labels"] == 0 and row["features diff"] == pytest.approx(0.09)
    assert row["test acc (classifier)"] == 0.1


def test_the_same_config_under_two_names_is_trained_once(tmp_path):
    from ssl_lib.experiments.runs import ensure_configs, run_dir_for

    SMOKE_TINY = {"dataset": "synthetic", "synthetic_train": 100, "synthetic_test": 20, "num_unlabeled": 50,
                  "epochs": 1, "max_iters_per_epoch": 2, "kmeans_n_init": 1}
    a = make_config({**SMOKE_TINY, "name": "first"})
    b = make_config({**SMOKE_TINY, "name": "second"})
    c = make_config({**SMOKE_TINY, "name": "third", "seed": 1})
    runs = ensure_configs({"a": a, "b": b, "c": c}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [a.run_name(), c.run_name()]
    assert runs["b"].run_dir == runs["a"].run_dir == run_dir_for(b, tmp_path) and runs["b"].name == "second"
    assert runs["c"].run_dir != runs["a"].run_dir
