"""The report's figures (ssl_lib/report/plots.py) on tiny fake runs and trials: no empty axes (every
visible Axes draws data; a panel with nothing to draw is hidden and says why), no warnings, and every
figure of the pages comes from plots.py."""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ssl_lib.config import make_config
from ssl_lib.experiments.runs import Run
from ssl_lib.method.columns import ITER_COLUMNS
from ssl_lib.report import plots

ROOT = Path(__file__).resolve().parents[1]


def _run(name: str, num_unlabeled: int, iters: int = 12, epochs: int = 3, no_unlabeled_terms: bool = False) -> Run:
    rng = np.random.default_rng(len(name))
    unlabeled_only = ("loss_aug", "loss_kmeans", "mask_rate", "pseudo_acc", "pseudo_acc_masked")
    iteration = {c: [None if no_unlabeled_terms and c in unlabeled_only else float(v) for v in rng.random(iters)]
                 for c in ITER_COLUMNS}
    iteration["lr"] = [0.03] * iters
    epoch = {c: list(rng.random(epochs)) for c in ("test_acc", "test_acc_raw", "test_loss", "cluster_acc",
                                                    "kmeans_inertia", "seconds")}
    cfg = make_config({"dataset": "synthetic", "num_unlabeled": num_unlabeled, "name": name})
    return Run(name, cfg, Path("."), {"confusion": [[3, 1, 0], [0, 4, 1], [1, 0, 5]], "classes": ["a", "b", "c"]},
               {"iteration": iteration, "epoch": epoch})


def _trial(number: int, state: str, value=None, epochs=(), params=None):
    from_log = SimpleNamespace(log=True)
    return SimpleNamespace(number=number, state=SimpleNamespace(name=state), value=value,
                           intermediate_values={e + 1: v for e, v in enumerate(epochs)}, params=params or {},
                           distributions={"lr": from_log, "tau": SimpleNamespace(log=False)})


TRIALS = [_trial(0, "COMPLETE", 0.3, (0.1, 0.2, 0.3), {"lr": 0.03, "tau": 0.95}),
          _trial(1, "COMPLETE", 0.5, (0.2, 0.4, 0.5), {"lr": 0.01, "tau": 0.9}),
          _trial(2, "PRUNED", None, (0.05, 0.2), {"lr": 0.3, "tau": 0.8}),
          _trial(3, "FAIL", None, (), {"lr": 0.1, "tau": 0.7}),
          _trial(4, "COMPLETE", 0.4, (0.2, 0.3, 0.4), {"lr": 0.003, "tau": 0.99})]

FULL, NO_UNLABELED = _run("exp1-m5000", 60), _run("exp1-m0", 0, no_unlabeled_terms=True)
for column in ("step", "grad_share_kmeans", "grad_share_fixmatch", "feature_norm_refit", "feature_norm_step",
               "centroid_to_feature_spread", "feature_spread"):  # the k-means term's size, recorded by a run that has it
    FULL.metrics["epoch"][column] = [8.0, 16.0, 24.0] if column == "step" else [0.2, 0.3, 0.25]
IMAGES = np.random.default_rng(0).integers(0, 255, (7, 3, 8, 8), dtype=np.uint8)
FLOATS = np.random.default_rng(1).random((3, 3, 8, 8))
PANELS = [("test_acc", "epoch", "test accuracy"), ("loss_aug", "iteration", "augmentation loss"),
          ("loss_sup", "iteration", "labeled loss"), ("test_loss", "epoch", "test loss")]
ROWS = [{"experiment": "exp1-m0", "best acc": 0.5, "best acc (writeup)": 0.6, "M (writeup)": 0,
         "label noise": 0.0, "best acc (three losses)": 0.5, "best acc (supervised only)": 0.45},
        {"experiment": "exp1-m5000", "best acc": 0.55, "best acc (writeup)": None, "M (writeup)": 5000,
         "label noise": 0.2, "best acc (three losses)": 0.4, "best acc (supervised only)": 0.3}]

#: every figure function of plots.py -> its calls here (the edge cases included)
CALLS = {
    "training_panels": [lambda: plots.training_panels(FULL), lambda: plots.training_panels(NO_UNLABELED)],
    "confusion_matrix": [lambda: plots.confusion_matrix(FULL)],
    "example_grid": [lambda: plots.example_grid(IMAGES, [0, 0, 0, 1, 1, 2, 2], ["a", "b", "c"], per_class=3)],
    "augmentation_grid": [lambda: plots.augmentation_grid(FLOATS, FLOATS, FLOATS)],
    "view_strip": [lambda: plots.view_strip(FLOATS[0], FLOATS, "views")],
    "partition_bars": [lambda: plots.partition_bars(["a", "b"], [3, 4], [5, 0])],
    "overlays": [lambda: plots.overlays({"a": FULL, "b": NO_UNLABELED}, PANELS),
                 lambda: plots.overlays({"b": NO_UNLABELED}, PANELS, ncols=3)],  # loss_aug: in no run
    "accuracy_bars": [lambda: plots.accuracy_bars(ROWS, chance=0.1)],
    "label_noise_curve": [lambda: plots.label_noise_curve(ROWS, chance=0.1)],
    "accuracy_against_m": [lambda: plots.accuracy_against_m(ROWS, {"clustering acc (features)": 0.4,
                                                                   "clustering acc (random network)": 0.2}, 0.1)],
    "study_history": [lambda: plots.study_history(TRIALS), lambda: plots.study_history([])],
    "study_parameters": [lambda: plots.study_parameters(TRIALS), lambda: plots.study_parameters(TRIALS[3:4])],
    "param_importances": [lambda: plots.param_importances({"lr": 0.7, "tau": 0.3}), lambda: plots.param_importances({})],
    "kmeans_term": [lambda: plots.kmeans_term({"with": FULL, "without": NO_UNLABELED})],  # None: no run has it
    "best_of_k": [lambda: plots.best_of_k({"with": [0.3, 0.4, 0.45], "without": [0.32, 0.38, 0.4]}, 2, chance=0.1)],
}


def _draws_data(ax) -> bool:
    return (any(len(line.get_xdata()) for line in ax.lines) or bool(ax.patches) or bool(ax.images)
            or any(len(c.get_paths()) or len(c.get_offsets()) for c in ax.collections))


def test_every_figure_function_is_exercised():
    functions = {name for name, f in inspect.getmembers(plots, inspect.isfunction)
                 if f.__module__ == plots.__name__ and not name.startswith("_")}
    assert set(CALLS) == functions - {"smooth", "to_data_uri"}


@pytest.mark.parametrize("call", [(name, i) for name, calls in CALLS.items() for i in range(len(calls))],
                         ids=lambda c: f"{c[0]}-{c[1]}")
def test_no_figure_has_an_empty_axes_or_warns(call):
    name, i = call
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a legend without labels, an all-NaN mean, ...: fail here
        fig = CALLS[name][i]()
        fig.canvas.draw()
    for ax in fig.axes:
        if ax.axison:
            assert _draws_data(ax), f"{name}: empty axes {ax.get_title()!r}"
        else:  # hidden: unused grid cells, or a panel that says why it has nothing
            assert not _draws_data(ax) or ax.images, f"{name}: a hidden axes with data {ax.get_title()!r}"


def test_a_panel_without_values_says_so():
    fig = plots.training_panels(NO_UNLABELED)
    hidden = {ax.get_title(): [t.get_text() for t in ax.texts] for ax in fig.axes if not ax.axison}
    assert set(hidden) == {"augmentation (FixMatch) loss", "k-means loss", "mask rate (confidence >= tau)",
                           "pseudo-label accuracy (all)", "pseudo-label accuracy (kept)"}
    assert all(texts == [plots.NO_VALUES] for texts in hidden.values())


def test_study_history_draws_the_trials_and_the_best_so_far():
    fig = plots.study_history(TRIALS)
    history, per_epoch = fig.axes
    points, best, pruned = history.lines
    assert list(points.get_xdata()) == [0, 1, 4] and list(points.get_ydata()) == [0.3, 0.5, 0.4]
    assert list(best.get_ydata()) == [0.3, 0.5, 0.5]  # the running maximum (the studies maximise)
    assert list(pruned.get_xdata()) == [2] and list(pruned.get_ydata()) == [0.2]  # its last epoch's value
    assert [list(line.get_xdata()) for line in per_epoch.lines] == [[1, 2, 3], [1, 2, 3], [1, 2], [1, 2, 3]]
    assert [ax.get_title() for ax in fig.axes] == ["optimisation history",
                                                   "validation accuracy per epoch (pruned trials end early)"]


def test_study_parameters_stars_the_best_trial_on_the_tuned_scale():
    fig = plots.study_parameters(TRIALS)
    lr, tau = fig.axes[:2]
    assert lr.get_xlabel() == "lr" and lr.get_xscale() == "log" and tau.get_xscale() == "linear"
    assert list(lr.lines[1].get_xdata()) == [0.01] and list(lr.lines[1].get_ydata()) == [0.5]  # trial 1
    assert sorted(lr.lines[0].get_xdata()) == [0.003, 0.01, 0.03]  # complete trials only


def test_every_figure_on_the_pages_comes_from_plots():
    """A notebook that draws with matplotlib or optuna.visualization itself escapes the tests above
    (the empty axes and the warnings of the 06-tuning page came from such cells)."""
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            source = "".join(cell["source"])
            if cell["cell_type"] == "code":
                for banned in ("plt.", "matplotlib", "optuna.visualization", ".plot("):
                    assert banned not in source, f"{path.name}: {banned!r} in a cell; draw with ssl_lib.report.plots"
