"""Live curves (ssl_lib/engine/live_curves.py): the event files a run writes, read back with
TensorBoard's own reader; a resumed run; a study's trials side by side; runs without TensorBoard."""

from __future__ import annotations

import gc
import math
import sys
from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("tensorboard")  # the dev extra installs it; the last test blocks it itself
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer  # noqa: E402

from ssl_lib.engine import live_curves as lc  # noqa: E402
from ssl_lib.engine.train import train  # noqa: E402
from ssl_lib.method.columns import ITER_COLUMNS  # noqa: E402
from conftest import run_metrics


def _scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _interval_means(metrics: dict, column: str, log_every: int) -> list[tuple[int, float]]:
    """By hand from metrics.json: (steps taken, mean over the steps since the previous point) at every
    host read: each log_every steps of an epoch and at its end; NaN means are left out."""
    it = metrics["iteration"]
    out, start = [], 0
    for i, (step, epoch) in enumerate(zip(it["step"], it["epoch"])):
        epoch_end = i + 1 == len(it["step"]) or it["epoch"][i + 1] != epoch
        first_of_epoch = it["epoch"].index(epoch)
        if (i + 1 - first_of_epoch) % log_every == 0 or epoch_end:
            values = [v for v in it[column][start: i + 1] if v is not None and math.isfinite(v)]
            if values:
                out.append((step + 1, float(np.mean(values))))
            start = i + 1
    return out


def _assert_curve(actual: list, expected: list, what: str = "") -> None:
    """The same steps, and values equal up to TensorBoard's float32."""
    assert [s for s, _ in actual] == [s for s, _ in expected], what
    assert [v for _, v in actual] == pytest.approx([v for _, v in expected], rel=1e-6), what


def _epoch_curve(metrics: dict, key: str) -> list:
    return list(zip(metrics["epoch"]["step"], metrics["epoch"][key]))


class AddToRecord:
    """A metric the package does not know about (as the k-means diagnostics will be): it must appear."""

    def on_evaluate(self, state):
        state.record["kmeans_grad_share"] = 0.25 * state.record["epoch"]


@pytest.fixture(scope="module")
def study(tmp_path_factory, small_cfg, small_data):
    """Two runs laid out as a study's trials (<study>/trials/trial-NNNN), the first with an EMA."""
    root = tmp_path_factory.mktemp("study")
    runs = {"trial-0000": replace(small_cfg, ema_decay=0.9).validate(), "trial-0001": replace(small_cfg, seed=1)}
    for name, cfg in runs.items():
        train(cfg, root / "trials" / name, quiet=True, data=small_data, callbacks=[AddToRecord()])
    return root, runs


def test_a_run_writes_every_curve_at_the_steps_of_its_metrics(study):
    root, runs = study
    run_dir, cfg = root / "trials" / "trial-0000", runs["trial-0000"]
    metrics = run_metrics(run_dir)
    scalars = _scalars(run_dir)
    # 300 labeled / 64: 5 steps an epoch, read after 3 and 5 steps (log_every 3): 2 epochs -> 3, 5, 8, 10
    assert [s for s, _ in scalars["train/loss_total"]] == [3, 5, 8, 10]
    for column in (*ITER_COLUMNS, "lr"):
        _assert_curve(scalars.get(f"train/{column}", []), _interval_means(metrics, column, cfg.log_every), column)
    assert "train/pseudo_acc_masked" not in scalars  # nothing passed tau in these steps: no NaN points
    for key in ("test_acc", "test_acc_raw", "test_loss", "cluster_acc", "kmeans_inertia", "kmeans_grad_share"):
        _assert_curve(scalars[f"epoch/{key}"], _epoch_curve(metrics, key), key)
    numbers = {k for k, v in metrics["epoch"].items() if not k.startswith("mean_") and k not in ("epoch", "step")
               and all(isinstance(x, (int, float)) for x in v)}
    assert {t.removeprefix("epoch/") for t in scalars if t.startswith("epoch/")} == numbers  # all of them


def test_a_study_shows_its_trials_side_by_side(study):
    root, _ = study
    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(root))
    mux.Reload()
    assert set(mux.Runs()) == {"trials/trial-0000", "trials/trial-0001"}
    assert "epoch/test_acc_raw" not in _scalars(root / "trials" / "trial-0001")  # no EMA: one score


class Interrupt:
    """Ctrl-C in epoch 2, after its first curves were written (past the checkpoint of epoch 1)."""

    def on_log(self, state, steps, rows, lrs):
        if state.epoch == 1:
            raise KeyboardInterrupt


def test_a_resumed_run_has_each_step_once(small_cfg, small_data, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(small_cfg, run_dir, quiet=True, data=small_data, callbacks=[Interrupt()])
    gc.collect()  # the interrupted session's writer is closed, as at the exit of `python -m ssl_lib train`
    (first,) = run_dir.glob("events.out.tfevents.*")
    assert [s for s, _ in _scalars(first)["train/loss_total"]] == [3, 5, 8]  # step 8 is past the checkpoint
    train(small_cfg, run_dir, resume=True, quiet=True, data=small_data)
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 2
    metrics = run_metrics(run_dir)
    scalars = _scalars(run_dir)
    # step 8 once, the resumed session's value
    _assert_curve(scalars["train/loss_total"], _interval_means(metrics, "loss_total", small_cfg.log_every))
    _assert_curve(scalars["epoch/test_acc"], _epoch_curve(metrics, "test_acc"))


def test_without_tensorboard_runs_train_the_same_and_say_so_once(study, small_data, tmp_path, monkeypatch, capsys):
    root, runs = study
    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)  # `import` of either now raises ImportError
    monkeypatch.setattr(lc, "_hinted", False)
    train(runs["trial-0000"], tmp_path / "a", quiet=True, data=small_data, callbacks=[AddToRecord()])
    assert lc.live_curves(tmp_path / "b") == []  # the next run of the process: no callback, and quiet
    assert capsys.readouterr().err.count(lc.HINT) == 1
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
    with_tb = run_metrics(root / "trials" / "trial-0000")
    without = run_metrics(tmp_path / "a")
    assert without["iteration"] == with_tb["iteration"]
    assert without["epoch"]["test_acc"] == with_tb["epoch"]["test_acc"]


# ------------------------------------------------------------------- a study's dashboard

def test_the_dashboard_opens_the_studys_journal_or_the_given_database(tmp_path, monkeypatch):
    optuna = pytest.importorskip("optuna")
    from ssl_lib.report import dashboard
    from ssl_lib.tuning.storage import open_storage

    study_dir = tmp_path / "exp2-kmeans-smoke"
    optuna.create_study(storage=open_storage(None, study_dir), study_name="exp2-kmeans-smoke")  # as tune makes it
    assert dashboard.study_storage(study_dir) == str(study_dir / "study.journal")
    url = "postgresql://tuner:secret@db.example/studies"
    assert dashboard.study_storage(study_dir, url) == url
    assert dashboard.study_storage(study_dir, f"journal:{tmp_path / 'x.journal'}") == str(tmp_path / "x.journal")
    served = []
    monkeypatch.setattr(dashboard, "serve", lambda *args: served.append(args))
    assert dashboard.main([str(study_dir), "--port", "8090"]) == 0
    assert served == [(str(study_dir / "study.journal"), "127.0.0.1", 8090)]
    # what optuna-dashboard makes of that path: the journal, with the study in it
    get_storage = pytest.importorskip("optuna_dashboard._storage_url").get_storage

    assert [s.study_name for s in get_storage(served[0][0]).get_all_studies()] == ["exp2-kmeans-smoke"]


@pytest.mark.parametrize("setup, fragment", [
    (lambda d: None, "not a directory"),
    (lambda d: d.mkdir(), "no study.journal in it"),
    (lambda d: d.mkdir() or (d / "study.json").write_text('{"storage": "postgresql://tuner:***@db/studies"}'),
     "the study is kept in postgresql://tuner:***@db/studies; give its URL with the password as STORAGE"),
])
def test_a_bad_study_is_one_line_and_exit_2(setup, fragment, tmp_path, capsys):
    from ssl_lib.report import build

    study = tmp_path / "study"
    setup(study)
    assert build.main(["dashboard", str(study)]) == 2  # python -m ssl_lib report dashboard STUDY
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: STUDY") and fragment in err[0], err


def test_make_dashboard_parses():
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(["make", "-n", "dashboard", "STUDY=runs/tuning/x", "STORAGE=postgresql://u:p@h/db", "PORT=9"],
                         cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert '-m ssl_lib report dashboard "runs/tuning/x" --storage "postgresql://u:p@h/db" --port 9' in out.stdout
