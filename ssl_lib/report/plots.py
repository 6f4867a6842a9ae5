"""Figures for the report pages. Each function returns a matplotlib Figure (already closed in
pyplot, so a notebook shows it exactly once: as the value of the cell)."""

from __future__ import annotations

import matplotlib.pyplot as plt  # in a kernel, importing pyplot activates the inline display hooks
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, NullFormatter

from ..experiments.runs import Run

CMAP = plt.get_cmap("viridis")


def _figure(nrows: int, ncols: int, size: tuple[float, float]):
    fig, axes = plt.subplots(nrows, ncols, figsize=size, squeeze=False)
    plt.close(fig)
    return fig, axes


def smooth(values, window: int) -> np.ndarray:
    """Trailing moving average that skips NaNs (NaN where the window holds none)."""
    values = np.asarray(values, dtype=float)
    if window <= 1 or len(values) == 0:
        return values
    ok = np.isfinite(values)
    csum = np.concatenate([[0.0], np.cumsum(np.where(ok, values, 0.0))])
    ccount = np.concatenate([[0], np.cumsum(ok)])
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    count = ccount[idx] - ccount[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (csum[idx] - csum[lo]) / np.maximum(count, 1), np.nan)


def _window(n: int) -> int:
    return max(1, n // 50)


def _no_values(ax, title: str, why: str) -> None:
    """A panel with nothing to draw: its title and why, no empty axes."""
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="0.4")


NO_VALUES = "no values in this run\n(no such term, or nothing passed tau)"


def _iter_panel(ax, run: Run, column: str, title: str, ylabel: str = "loss") -> None:
    y = run.iteration(column)
    if not np.isfinite(y).any():
        return _no_values(ax, title, NO_VALUES)
    x = np.arange(len(y))
    ax.plot(x, y, color="0.75", lw=0.6, label="per iteration")
    ax.plot(x, smooth(y, _window(len(y))), color="C0", lw=1.5, label=f"moving mean ({_window(len(y))})")
    ax.legend(fontsize=7)
    ax.set_title(title)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)


def _epoch_panel(ax, run: Run, column: str, title: str, ylabel: str, writeup: float | None = None) -> None:
    y = run.epoch(column)
    if not np.isfinite(y).any():
        return _no_values(ax, title, "no values in this run")
    x = np.arange(1, len(y) + 1)
    ax.plot(x, y, marker="o", ms=3, color="C1")
    if writeup is not None:
        ax.axhline(writeup, color="C3", ls="--", lw=1, label=f"writeup best {writeup:.3f}")
        ax.legend(fontsize=7)
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)


def training_panels(run: Run):
    """The writeup's five panels (labeled, augmentation and k-means losses per iteration; test loss and
    accuracy per epoch) on the top row; mask rate and pseudo-label accuracy below."""
    fig, axes = _figure(2, 5, (22, 8))
    _iter_panel(axes[0, 0], run, "loss_sup", "labeled loss")
    _iter_panel(axes[0, 1], run, "loss_aug", "augmentation (FixMatch) loss")
    _iter_panel(axes[0, 2], run, "loss_kmeans", "k-means loss")
    _epoch_panel(axes[0, 3], run, "test_loss", "validation (test) loss", "mean cross-entropy")
    w = run.writeup
    _epoch_panel(axes[0, 4], run, "test_acc", "validation (test) accuracy", "accuracy", w.best_acc if w else None)
    _iter_panel(axes[1, 0], run, "mask_rate", "mask rate (confidence >= tau)", "fraction of unlabeled batch")
    _iter_panel(axes[1, 1], run, "pseudo_acc", "pseudo-label accuracy (all)", "accuracy")
    _iter_panel(axes[1, 2], run, "pseudo_acc_masked", "pseudo-label accuracy (kept)", "accuracy")
    _epoch_panel(axes[1, 3], run, "cluster_acc", "test clustering accuracy", "accuracy")
    _epoch_panel(axes[1, 4], run, "seconds", "seconds per epoch", "s")
    fig.suptitle(f"{run.name}  (M = {run.config.num_unlabeled}, w = {run.config.w_labeled:g} / "
                 f"{run.config.w_augment:g} / {run.config.w_kmeans:g})")
    fig.tight_layout()
    return fig


def confusion_matrix(run: Run):
    """Row-normalised confusion matrix of the final model on the test set."""
    conf = np.asarray(run.summary["confusion"], dtype=float)
    rates = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    classes = run.summary["classes"]
    fig, axes = _figure(1, 1, (6.5, 5.5))
    ax = axes[0, 0]
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            if conf[i, j]:
                ax.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(f"{run.name}: final model, rows sum to 1")
    fig.tight_layout()
    return fig


def _show(ax, image) -> None:
    """Show a 3 x H x W image (uint8, or float in [0, 1])."""
    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 1)
    ax.imshow(np.transpose(arr, (1, 2, 0)), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def example_grid(images, labels, classes, per_class: int = 8, seed: int = 0):
    """``per_class`` random training images of every class, one class per row."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    fig, axes = _figure(len(classes), per_class, (per_class * 1.1, len(classes) * 1.15))
    for c, name in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        pick = rng.choice(idx, size=min(per_class, len(idx)), replace=False) if len(idx) else []
        for j in range(per_class):
            ax = axes[c, j]
            if j < len(pick):
                _show(ax, images[int(pick[j])])
            else:
                ax.axis("off")
        axes[c, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    return fig


def augmentation_grid(originals, weak, strong, titles=("original", "weak view", "strong view")):
    """One row per image: the original beside its weak and strong views (float [0, 1] B x 3 x H x W)."""
    n = len(originals)
    fig, axes = _figure(n, 3, (5.4, 1.9 * n))
    for i in range(n):
        for j, batch in enumerate((originals, weak, strong)):
            _show(axes[i, j], batch[i])
            if i == 0:
                axes[i, j].set_title(titles[j])
    fig.tight_layout()
    return fig


def view_strip(original, views, title: str):
    """One original and several views of it drawn in the same batch."""
    n = len(views)
    fig, axes = _figure(1, n + 1, (1.4 * (n + 1), 1.8))
    _show(axes[0, 0], original)
    axes[0, 0].set_title("original", fontsize=8)
    for j in range(n):
        _show(axes[0, j + 1], views[j])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def partition_bars(classes, labeled_counts, unlabeled_counts):
    fig, axes = _figure(1, 1, (8, 3))
    ax = axes[0, 0]
    x = np.arange(len(classes))
    ax.bar(x, labeled_counts, label="labeled")
    ax.bar(x, unlabeled_counts, bottom=labeled_counts, label="unlabeled")
    ax.set_xticks(x, classes, rotation=30, ha="right")
    ax.set_ylabel("training images")
    ax.legend()
    fig.tight_layout()
    return fig


def overlays(runs: dict[str, Run], panels, label=None, ncols: int = 3):
    """Curves of several runs on shared axes, one panel per ``(column, per, title)`` in ``panels``.

    ``per="epoch"``: an epoch column against the epoch. ``per="iteration"``: an iteration column,
    smoothed, against the fraction of training done (the runs differ in length).
    """
    ncols = min(ncols, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = _figure(nrows, ncols, (6 * ncols, 3.8 * nrows))
    for i, (column, per, title) in enumerate(panels):
        ax = axes[i // ncols, i % ncols]
        for k, (name, run) in enumerate(runs.items()):
            color = CMAP(k / max(len(runs) - 1, 1))
            text = label(name, run) if label else name
            y = run.epoch(column) if per == "epoch" else run.iteration(column)
            if not np.isfinite(y).any():
                continue
            if per == "epoch":
                ax.plot(np.arange(1, len(y) + 1), y, marker="o", ms=3, color=color, label=text)
            else:
                ax.plot(np.linspace(0, 1, len(y)), smooth(y, _window(len(y))), color=color, label=text)
        if not ax.lines:
            _no_values(ax, title, "no values in these runs")
            continue
        ax.set_title(title)
        ax.set_xlabel("epoch" if per == "epoch" else "fraction of training (iterations)")
        ax.legend(fontsize=7)
    for j in range(len(panels), nrows * ncols):
        axes[j // ncols, j % ncols].axis("off")
    fig.tight_layout()
    return fig


def accuracy_bars(rows: list[dict], ours: str = "best acc", theirs: str = "best acc (writeup)",
                  chance: float | None = None):
    """Our accuracy beside the writeup's, one pair of bars per experiment."""
    names = [r["experiment"] for r in rows]
    x = np.arange(len(names))
    fig, axes = _figure(1, 1, (max(6, 1.1 * len(names)), 3.8))
    ax = axes[0, 0]
    ax.bar(x - 0.2, [r[ours] or 0 for r in rows], 0.4, label="ours")
    ax.bar(x + 0.2, [r[theirs] or 0 for r in rows], 0.4, label="writeup")
    ax.set_xticks(x, names, rotation=20, ha="right")
    return _finish_accuracy(fig, ax, chance, ylabel=ours)


def _finish_accuracy(fig, ax, chance: float | None, ylabel: str, xlabel: str | None = None,
                     title: str | None = None, legend_size: int = 8):
    """The accuracy figures' common end: chance as a dotted line, the axis from 0 to 1, the legend."""
    if chance is not None:
        ax.axhline(chance, color="k", ls=":", lw=1, label="chance")
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    return fig


def label_noise_curve(rows: list[dict], chance: float | None = None):
    """Experiment 3: best test accuracy against the fraction of wrong labels, with the three losses and
    with the supervised loss alone (``rows`` from ``analysis.experiment_3_rows``)."""
    fig, axes = _figure(1, 1, (5.5, 3.8))
    ax = axes[0, 0]
    noise = [r["label noise"] for r in rows]
    ax.plot(noise, [r["best acc (three losses)"] for r in rows], "o-", label="three losses (FixMatch + k-means)")
    ax.plot(noise, [r["best acc (supervised only)"] for r in rows], "s--", label="supervised loss alone")
    return _finish_accuracy(fig, ax, chance, "best test accuracy", "fraction of labeled images with a wrong label",
                            "Experiment 3: label noise")


def accuracy_against_m(rows: list[dict], no_label: dict | None = None, chance: float | None = None):
    """Experiment 1: best test accuracy against the fraction of unlabeled images, ours and the writeup's,
    with the run without labels shown by the clustering accuracy of its features (and its random-network
    floor), since its classifier cannot beat chance (``rows`` from ``analysis.experiment_1_rows``)."""
    fig, axes = _figure(1, 1, (6.5, 3.8))
    ax = axes[0, 0]
    frac = [r["M (writeup)"] / 50_000 for r in rows]
    ax.plot(frac, [r["best acc"] for r in rows], "o-", label="ours: classifier")
    ax.plot(frac, [r["best acc (writeup)"] for r in rows], "s--", label="writeup: classifier")
    if no_label is not None and no_label.get("clustering acc (features)") is not None:
        ax.plot([1.0], [no_label["clustering acc (features)"]], "D", ms=8, label="ours, no labels: feature clustering")
        ax.plot([1.0], [no_label["clustering acc (random network)"]], "x", ms=8, color="gray",
                label="random network: feature clustering")
    return _finish_accuracy(fig, ax, chance, "test accuracy", "fraction of training images without a label (M / 50,000)",
                            "Experiment 1: accuracy against M", legend_size=7)


# ------------------------------------------------------------------------------ tuning studies
# ``trials``: a study's trials as Optuna gives them (FrozenTrial: number, state.name, value, params,
# intermediate_values, distributions); drawn here rather than with optuna.visualization.matplotlib,
# whose functions are experimental (a warning each) and draw into figures of their own.

def _state(trial) -> str:
    return trial.state.name.lower()


def study_history(trials, target: str = "val acc (final epoch)"):
    """A study at a glance: each finished trial's value against its number, with the best so far
    (pruned trials at the last epoch they reached); and each trial's value per epoch, the pruned
    ones ending early."""
    fig, axes = _figure(1, 2, (13, 4))
    ax, per_epoch = axes[0, 0], axes[0, 1]
    complete = sorted((t for t in trials if _state(t) == "complete"), key=lambda t: t.number)
    pruned = [t for t in trials if _state(t) == "pruned" and t.intermediate_values]
    if complete:
        numbers = [t.number for t in complete]
        ax.plot(numbers, [t.value for t in complete], "o", color="C0", label="complete")
        ax.step(numbers, np.maximum.accumulate([t.value for t in complete]), where="post", color="C3", label="best so far")
    if pruned:
        ax.plot([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned], "x",
                color="0.5", label="pruned (at its last epoch)")
    if ax.lines:
        ax.set_title("optimisation history")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("trial")
        ax.set_ylabel(target)
        ax.legend(fontsize=7)
    else:
        _no_values(ax, "optimisation history", "no finished trial yet")
    for t in sorted(trials, key=lambda t: t.number):
        if t.intermediate_values:
            epochs = sorted(t.intermediate_values)
            done = _state(t) == "complete"
            per_epoch.plot(epochs, [t.intermediate_values[e] for e in epochs], marker="o", ms=3, lw=1,
                           color="C0" if done else "0.6", ls="-" if done else "--", alpha=0.9 if done else 0.7)
    if per_epoch.lines:
        per_epoch.set_title("validation accuracy per epoch (pruned trials end early)")
        per_epoch.xaxis.set_major_locator(MaxNLocator(integer=True))
        per_epoch.set_xlabel("epoch")
        per_epoch.set_ylabel("val acc")
        per_epoch.legend(handles=[Line2D([], [], color="C0", label="complete"),
                                  Line2D([], [], color="0.6", ls="--", label="pruned, running or failed")], fontsize=7)
    else:
        _no_values(per_epoch, "validation accuracy per epoch", "no trial has reported an epoch yet")
    fig.tight_layout()
    return fig


def study_parameters(trials, target: str = "val acc (final epoch)", ncols: int = 5):
    """Each tuned parameter against the value of the complete trials, the best one starred (a log
    axis for the parameters tuned on a log scale)."""
    complete = [t for t in trials if _state(t) == "complete"]
    names = sorted({k for t in complete for k in t.params})
    if not names:
        fig, axes = _figure(1, 1, (5, 2))
        _no_values(axes[0, 0], "tuned parameters", "no complete trial yet")
        return fig
    best = max(complete, key=lambda t: t.value)
    ncols = min(ncols, len(names))
    nrows = -(-len(names) // ncols)
    fig, axes = _figure(nrows, ncols, (3.4 * ncols, 3 * nrows))
    for i, name in enumerate(names):
        ax = axes[i // ncols, i % ncols]
        have = [t for t in complete if name in t.params]
        xs = [t.params[name] for t in have]
        ax.plot(xs, [t.value for t in have], "o", color="C0", alpha=0.8, label="complete")
        if all(isinstance(x, int) for x in xs):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if name in best.params:
            ax.plot([best.params[name]], [best.value], "*", ms=14, color="C3", label=f"best (trial {best.number})")
        if getattr(best.distributions.get(name), "log", False):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # a narrow log range labels its minor ticks: unreadable
        ax.set_xlabel(name)
        if i % ncols == 0:
            ax.set_ylabel(target)
        if i == 0:
            ax.legend(fontsize=7)
    for j in range(len(names), nrows * ncols):
        axes[j // ncols, j % ncols].axis("off")
    fig.tight_layout()
    return fig


def param_importances(importances: dict[str, float]):
    """How much of the value's variance each parameter explains (``optuna.importance``), largest on top."""
    names = sorted(importances, key=importances.get)
    fig, axes = _figure(1, 1, (6, 0.5 + 0.45 * max(len(names), 1)))
    ax = axes[0, 0]
    if not names:
        _no_values(ax, "parameter importance", "no parameters")
        return fig
    ax.barh(names, [importances[n] for n in names], color="C0")
    ax.set_xlabel("importance (fANOVA, sums to 1)")
    ax.set_title("parameter importance")
    fig.tight_layout()
    return fig


def to_data_uri(fig) -> str:
    """A figure as an embedded PNG (a data: URI), so an HTML page needs no file beside it."""
    import base64
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def kmeans_term(runs: dict[str, Run]):
    """How large the k-means term is, per evaluation, for each run that has one: its share of the
    gradient norm (beside FixMatch's), the norm of the features the refit clusters against the z the
    step pulls with the refit features' spread (a falling spread: the term shrinking the features),
    and the centroids' spread against the features'. None when no run has the term."""
    runs = {name: r for name, r in runs.items() if np.isfinite(r.epoch("grad_share_kmeans")).any()}
    if not runs:
        return None
    fig, axes = _figure(1, 3, (18, 4.2))
    for i, (name, run) in enumerate(runs.items()):
        color = f"C{i % 10}"
        steps = run.epoch("step")
        x = steps if np.isfinite(steps).all() and len(steps) else np.arange(1, len(run.epoch("grad_share_kmeans")) + 1)
        axes[0, 0].plot(x, run.epoch("grad_share_kmeans"), marker="o", ms=3, color=color, label=f"{name}: k-means")
        axes[0, 0].plot(x, run.epoch("grad_share_fixmatch"), ls=":", color=color, label=f"{name}: FixMatch")
        axes[0, 1].plot(x, run.epoch("feature_norm_refit"), marker="o", ms=3, color=color, label=f"{name}: refit")
        axes[0, 1].plot(x, run.epoch("feature_norm_step"), ls="--", color=color, label=f"{name}: step")
        spread = run.epoch("feature_spread")
        if len(spread) == len(x):  # runs of earlier versions recorded it at refits only
            axes[0, 1].plot(x, spread, ls=":", marker="x", ms=3, color=color, label=f"{name}: refit spread")
        axes[0, 2].plot(x, run.epoch("centroid_to_feature_spread"), marker="o", ms=3, color=color, label=name)
    for ax, title, ylabel in ((axes[0, 0], "share of the gradient norm", "||grad w_j L_j|| / ||grad L||"),
                              (axes[0, 1], "features: mean norm (refit, step) and spread (refit)",
                               "mean ||z||; rms distance to the mean"),
                              (axes[0, 2], "centroids' spread / features' spread", "ratio")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    axes[0, 0].set_ylim(0, 1)
    return fig


def best_of_k(curves: dict[str, list[float]], k: int, chance: float | None = None):
    """The expected test accuracy of the validation-best of k trials against k, one line per pool,
    the headline k marked (the shape says how much a larger study buys on each side)."""
    fig, axes = _figure(1, 1, (7, 4))
    ax = axes[0, 0]
    for i, (label, curve) in enumerate(curves.items()):
        ks = np.arange(1, len(curve) + 1)
        ax.plot(ks, curve, marker="o", ms=3, color=f"C{i}", label=label)
    ax.axvline(k, color="0.5", ls=":", lw=1, label=f"headline k = {k}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _finish_accuracy(fig, ax, chance, "expected test acc of the validation-best", "k (trials per study)")
