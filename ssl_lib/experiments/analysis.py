"""Numbers the report pages show: tables across runs, our figures beside the writeup's, and the
writeup's takeaways checked against measured curves.

Everything here is a pure function of finished runs (:class:`ssl_lib.experiments.runs.Run`), so it is
tested on hand-made metrics and the notebooks only display what it returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .grid import EXPERIMENT_1, EXPERIMENT_2, LABEL_NOISE, WRITEUP, writeup_m
from .runs import Run
from .stats import mean_sd, paired_t

HOLDS, FAILS, UNMEASURABLE = "holds", "does not hold", "not measurable"


# ------------------------------------------------------------------------------------- basics

def n_test(run: Run) -> int:
    """Test images the run was scored on (the confusion matrix counts each once)."""
    return int(np.asarray(run.summary["confusion"]).sum())


def chance_level(run: Run) -> float:
    return 1.0 / run.summary["num_classes"]


def above_chance(acc: float, n: int, num_classes: int, z: float = 3.0) -> bool:
    """Accuracy on ``n`` test images beats guessing by more than ``z`` binomial standard errors."""
    p = 1.0 / num_classes
    return acc > p + z * math.sqrt(p * (1 - p) / max(n, 1))


def diff(ours: float | None, theirs: float | None) -> float | None:
    return None if ours is None or theirs is None else ours - theirs


def quarter_means(values) -> list[float]:
    """Means of the four consecutive quarters of a series (NaNs ignored); NaN where a quarter is empty."""
    values = np.asarray(values, dtype=float)
    out = []
    for part in np.array_split(values, 4):
        part = part[np.isfinite(part)]
        out.append(float(part.mean()) if len(part) else float("nan"))
    return out


def trend(values) -> float:
    """Change from the first to the last quarter of a series (mean of the last minus mean of the first)."""
    q = quarter_means(values)
    return q[3] - q[0]


def late_drift(values) -> float:
    """How much a series still moves in the second half of training, as a fraction of its early level:
    ``|mean(Q4) - mean(Q2)| / |mean(Q1)|`` over the four quarters of the iterations."""
    q = quarter_means(values)
    if not all(math.isfinite(v) for v in q) or q[0] == 0:
        return float("nan")
    return abs(q[3] - q[1]) / abs(q[0])


# ------------------------------------------------------------------------------------- tables

def headline_rows(runs: dict[str, Run]) -> list[dict]:
    """One row per run: what it varies, our accuracy and time, the writeup's, and the differences."""
    rows = []
    for name, run in runs.items():
        s, cfg, w = run.summary, run.config, WRITEUP.get(name)
        rows.append({
            "experiment": name,
            "M (writeup)": writeup_m(name),
            "M (this run)": cfg.num_unlabeled,
            "train images": s["num_labeled"] + s["num_unlabeled"],
            "w_labeled": cfg.w_labeled, "w_augment": cfg.w_augment, "w_kmeans": cfg.w_kmeans,
            "epochs": s["epochs"], "epochs (writeup)": w.epochs if w else None,
            "best acc": s["best_acc"], "best acc (writeup)": w.best_acc if w else None,
            "best acc diff": diff(s["best_acc"], w.best_acc if w else None),
            "final acc": s["final_acc"], "final acc (writeup)": w.final_acc if w else None,
            "final acc diff": diff(s["final_acc"], w.final_acc if w else None),
            "cluster acc": s["final_cluster_acc"],
            "s/epoch": s["seconds_per_epoch"], "s/epoch (writeup)": w.seconds_per_epoch if w else None,
            "device": s.get("environment", {}).get("device"),
        })
    return rows


EXPERIMENT_1_COLUMNS = ("experiment", "M (writeup)", "M (this run)", "epochs", "epochs (writeup)", "best acc",
                        "best acc (writeup)", "best acc diff", "final acc", "final acc (writeup)",
                        "final acc diff", "cluster acc", "s/epoch", "s/epoch (writeup)")
EXPERIMENT_2_COLUMNS = ("experiment", "w_kmeans", "w_augment", "w_labeled", "M (this run)", "epochs",
                        "best acc", "best acc (writeup)", "best acc diff", "final acc", "final acc (writeup)",
                        "final acc diff", "cluster acc", "s/epoch", "s/epoch (writeup)")


def experiment_rows(runs: dict[str, Run], names, columns) -> list[dict]:
    rows = {r["experiment"]: r for r in headline_rows({n: runs[n] for n in names if n in runs})}
    return [{c: rows[n][c] for c in columns} for n in names if n in rows]


def experiment_1_rows(runs: dict[str, Run]) -> list[dict]:
    return experiment_rows(runs, EXPERIMENT_1, EXPERIMENT_1_COLUMNS)


def experiment_2_rows(runs: dict[str, Run]) -> list[dict]:
    return experiment_rows(runs, EXPERIMENT_2, EXPERIMENT_2_COLUMNS)


def run_vs_writeup(run: Run) -> list[dict]:
    """One run's headline figures beside the writeup's for the same experiment (None where it gives none)."""
    s, w = run.summary, run.writeup

    def theirs(attr):
        return getattr(w, attr) if w else None

    return [
        {"figure": "best test accuracy", "ours": s["best_acc"], "writeup": theirs("best_acc"),
         "diff": diff(s["best_acc"], theirs("best_acc"))},
        {"figure": "final test accuracy", "ours": s["final_acc"], "writeup": theirs("final_acc"),
         "diff": diff(s["final_acc"], theirs("final_acc"))},
        {"figure": "best epoch", "ours": s["best_epoch"], "writeup": None, "diff": None},
        {"figure": "epochs", "ours": s["epochs"], "writeup": theirs("epochs"), "diff": None},
        {"figure": "final clustering accuracy", "ours": s["final_cluster_acc"], "writeup": None, "diff": None},
        {"figure": "seconds per epoch", "ours": s["seconds_per_epoch"], "writeup": theirs("seconds_per_epoch"),
         "diff": None},
        {"figure": "training images per second", "ours": s["images_per_sec"], "writeup": None, "diff": None},
    ]


def compare_to_writeup(runs: dict[str, Run]) -> dict:
    """How many runs beat the writeup's best accuracy, and the mean difference (ours minus theirs)."""
    diffs = [r["best acc diff"] for r in headline_rows(runs) if r["best acc diff"] is not None]
    return {"runs": len(diffs), "better": sum(d > 0 for d in diffs),
            "mean_best_acc_diff": float(np.mean(diffs)) if diffs else float("nan")}


def m_rows(cfgs: dict, n_train: int) -> list[dict]:
    """M of every run as the writeup gives it and as a profile uses it (``cfgs``: name -> resolved Config)."""
    return [{"experiment": name, "M (writeup, of 50,000)": writeup_m(name), "M (this profile)": c.num_unlabeled,
             "labeled": n_train - c.num_unlabeled, "unlabeled fraction": c.num_unlabeled / n_train,
             "epochs": c.epochs} for name, c in cfgs.items()]


# ---------------------------------------------------------------------- Experiment 3: label noise

def _noise_runs(runs) -> dict[tuple[str, int], Run]:
    """``{(experiment, seed): Run}`` from the grid's ``{name: Run}`` or Experiment 3's ``{(name, seed): Run}``."""
    return {(run.name, run.config.seed): run for run in runs.values()}


def experiment_3_rows(runs) -> list[dict]:
    """One row per noise level: best test accuracy with the three losses and with the supervised loss
    alone, mean and sd over the seeds both ran (one seed: no sd), and what the unlabeled losses add
    at that level (three losses minus supervised, mean over seeds)."""
    by = _noise_runs(runs)
    rows = []
    for noise in LABEL_NOISE:
        ssl_name, sup_name = f"exp3-noise{noise:g}", f"exp3-sup-noise{noise:g}"
        seeds = sorted(s for (n, s) in by if n == ssl_name and (sup_name, s) in by)
        if not seeds:
            continue
        ssl = [by[ssl_name, s].summary for s in seeds]
        sup = [by[sup_name, s].summary for s in seeds]
        (best_ssl, sd_ssl), (best_sup, sd_sup) = mean_sd(x["best_acc"] for x in ssl), mean_sd(x["best_acc"] for x in sup)
        rows.append({"label noise": noise, "seeds": len(seeds), "labels flipped": ssl[0].get("labels_flipped"),
                     "best acc (three losses)": best_ssl, "sd (three losses)": sd_ssl,
                     "best acc (supervised only)": best_sup, "sd (supervised only)": sd_sup,
                     "gain diff": best_ssl - best_sup,
                     "final acc (three losses)": mean_sd(x["final_acc"] for x in ssl)[0],
                     "final acc (supervised only)": mean_sd(x["final_acc"] for x in sup)[0]})
    return rows


def check_label_noise(runs) -> Finding:
    """Experiment 3: does the unlabeled signal make the classifier more robust to wrong labels? It does
    when the accuracy the three losses lose from no noise to the most noise is smaller than what the
    supervised loss alone loses, beyond the seed-to-seed noise: the two losses are paired by seed (a
    seed fixes the split and the flipped labels of both), and the verdict is the paired t test of
    their difference (p < 0.05). One seed gives no verdict: the seed spread is then not measured by
    these runs (it is larger than the test set's binomial noise; the quick profile trains one seed,
    the full profile three)."""
    claim = "The unlabeled losses (FixMatch and k-means) make the classifier more robust to label noise."
    test = ("the accuracy lost from the lowest to the highest noise is smaller with the three losses than with "
            "the supervised loss alone, paired by seed, by a paired t test at p < 0.05 (the seed spread is the noise)")
    rows = experiment_3_rows(runs)
    if len(rows) < 2:
        return Finding(claim, "needs Experiment 3's runs at two noise levels or more", UNMEASURABLE, "not run", rows)
    by = _noise_runs(runs)
    lo, hi = LABEL_NOISE[0], rows[-1]["label noise"]
    names = [f"exp3-noise{lo:g}", f"exp3-noise{hi:g}", f"exp3-sup-noise{lo:g}", f"exp3-sup-noise{hi:g}"]
    seeds = sorted(s for (n, s) in by if n == names[0] and all((m, s) in by for m in names))
    drop_ssl = {s: by[names[0], s].summary["best_acc"] - by[names[1], s].summary["best_acc"] for s in seeds}
    drop_sup = {s: by[names[2], s].summary["best_acc"] - by[names[3], s].summary["best_acc"] for s in seeds}
    result = paired_t(drop_sup, drop_ssl, names=("supervised only", "three losses"))
    measured = (f"from noise {lo:g} to {hi:g} over {len(seeds)} seed(s): the three losses lose "
                f"{np.mean(list(drop_ssl.values())):.3f}, the supervised loss alone {np.mean(list(drop_sup.values())):.3f}")
    if result["p"] is None:
        return Finding(claim, test, UNMEASURABLE, measured + (
            "; one seed per level: the difference cannot be told from the seed spread (not measured by these "
            "runs; measured elsewhere: docs/results.md, Experiment 3)" if len(seeds) < 2 else
            "; no spread across seeds to measure the noise by"), rows)
    verdict = HOLDS if result["mean"] > 0 and result["p"] < 0.05 else FAILS
    measured += (f"; difference {result['mean']:+.3f} ({result['level']:.0%} CI {result['low']:+.3f} to "
                 f"{result['high']:+.3f}, p = {result['p']:.3g})")
    return Finding(claim, test, verdict, measured, rows)


def feature_clustering_rows(runs: dict[str, Run]) -> list[dict]:
    """What each run's features learnt, labels aside: k-means on its test features against the same on
    a random network of the same architecture, beside the classifier's own accuracy."""
    rows = []
    for name, run in runs.items():
        s = run.summary
        ours, floor = s.get("feature_cluster_acc"), s.get("feature_cluster_acc_random_net")
        rows.append({"experiment": name, "labels": s["num_labeled"], "test acc (classifier)": s["final_acc"],
                     "clustering acc (features)": ours, "clustering acc (random network)": floor,
                     "features diff": None if ours is None or floor is None else ours - floor})
    return rows


# ---------------------------------------------------------------------------------- takeaways

@dataclass
class Finding:
    """One of the writeup's claims, what we measured, and whether the claim survives."""

    claim: str
    test: str  # how the verdict is computed, in one sentence
    verdict: str  # HOLDS | FAILS | UNMEASURABLE
    measured: str  # the figure behind the verdict, in one line
    rows: list[dict] = field(default_factory=list)  # per-run detail

    @property
    def holds(self) -> bool:
        return self.verdict == HOLDS


def _no_labels(run: Run) -> bool:
    return run.summary["num_labeled"] == 0


def check_above_chance(runs: dict[str, Run]) -> Finding:
    """Takeaway 1: every model beats chance except the one without labels (M = |D|)."""
    rows = []
    for name, run in runs.items():
        acc, n = run.summary["final_acc"], n_test(run)
        rows.append({"experiment": name, "labels": run.summary["num_labeled"], "final acc": acc,
                     "chance": chance_level(run),
                     "margin (3 s.e.)": 3 * math.sqrt(chance_level(run) * (1 - chance_level(run)) / n),
                     "above chance": above_chance(acc, n, run.summary["num_classes"]),
                     "cluster acc": run.summary["final_cluster_acc"]})
    labeled = [r for r, run in zip(rows, runs.values()) if not _no_labels(run)]
    unlabeled = [r for r, run in zip(rows, runs.values()) if _no_labels(run)]
    if not labeled or not unlabeled:
        verdict = UNMEASURABLE
    else:
        verdict = HOLDS if all(r["above chance"] for r in labeled) and not any(
            r["above chance"] for r in unlabeled) else FAILS
    above = sum(r["above chance"] for r in labeled)
    worst = min(labeled, key=lambda r: r["final acc"]) if labeled else None
    measured = (f"{above}/{len(labeled)} runs with labels beat chance"
                + (f" (lowest: {worst['experiment']} at {worst['final acc']:.3f})" if worst else "")
                + "; without labels: " + ", ".join(f"{r['experiment']} {r['final acc']:.3f}" for r in unlabeled))
    return Finding("Every model except M = 50000 (no labels) does better than chance.",
                   "final test accuracy above 1/classes by more than 3 binomial standard errors, for every run "
                   "with labels, and not for the run without labels",
                   verdict, measured, rows)


def check_augment_direction(runs: dict[str, Run]) -> Finding:
    """Takeaway 2: the augmentation loss rises over training when M is small and falls when M is large."""
    rows = []
    for name in EXPERIMENT_1:
        run = runs.get(name)
        if run is None or run.config.num_unlabeled == 0 or run.config.w_augment == 0:
            continue
        q = quarter_means(run.iteration("loss_aug"))
        rows.append({"experiment": name, "M (this run)": run.config.num_unlabeled, "first quarter": q[0],
                     "last quarter": q[3], "change": q[3] - q[0],
                     "direction": "up" if q[3] > q[0] else "down" if q[3] < q[0] else "flat"})
    rows.sort(key=lambda r: r["M (this run)"])
    finite = [r for r in rows if math.isfinite(r["change"])]
    if len(finite) < 2 or all(r["change"] == 0 for r in finite):  # e.g. no pseudo-label ever passed tau
        verdict = UNMEASURABLE
    else:
        verdict = HOLDS if finite[0]["change"] > 0 and finite[-1]["change"] < 0 else FAILS
    measured = "; ".join(f"M={r['M (this run)']}: {r['direction']} ({r['change']:+.3g})" for r in rows)
    return Finding("The augmentation (FixMatch) loss changes direction as M grows: it rises over training "
                   "for small unlabeled sets and falls for large ones.",
                   "mean of the last quarter of iterations minus the first quarter: positive at the smallest "
                   "M > 0 and negative at the largest M",
                   verdict, measured, rows)


def check_kmeans_flattening(runs: dict[str, Run]) -> Finding:
    """Takeaway 3: the larger the k-means weight, the flatter the k-means loss curve."""
    rows = []
    for name in EXPERIMENT_2:
        run = runs.get(name)
        if run is None:
            continue
        q = quarter_means(run.iteration("loss_kmeans"))
        rows.append({"experiment": name, "w_kmeans": run.config.w_kmeans, "first quarter": q[0],
                     "second quarter": q[1], "last quarter": q[3],
                     "late drift": late_drift(run.iteration("loss_kmeans"))})
    rows.sort(key=lambda r: r["w_kmeans"])
    drifts = [r["late drift"] for r in rows]
    if len(rows) < 2 or not all(math.isfinite(d) for d in drifts):
        verdict = UNMEASURABLE
    else:
        verdict = HOLDS if all(a > b for a, b in zip(drifts, drifts[1:])) else FAILS
    measured = "; ".join(f"w_kmeans={r['w_kmeans']:g}: drift {r['late drift']:.3g}" for r in rows)
    return Finding("The k-means loss flattens out as its weight grows.",
                   "late drift |Q4 - Q2| / |Q1| of the (unweighted) k-means loss over the four quarters of the "
                   "iterations decreases strictly as w_kmeans grows",
                   verdict, measured, rows)


def check_not_converged(runs: dict[str, Run]) -> Finding:
    """The writeup's side note: no run was trained to convergence (accuracy still rising at the end)."""
    rows = []
    for name, run in runs.items():
        acc, loss = run.epoch("test_acc"), run.epoch("test_loss")
        if _no_labels(run) or len(acc) < 2:
            continue
        rows.append({"experiment": name, "best epoch": run.summary["best_epoch"], "epochs": len(acc),
                     "best at last epoch": run.summary["best_epoch"] == len(acc),
                     "test loss still falling": bool(loss[-1] < loss[-2])})
    still = [r for r in rows if r["best at last epoch"] or r["test loss still falling"]]
    verdict = UNMEASURABLE if not rows else HOLDS if len(still) * 2 > len(rows) else FAILS
    measured = f"{len(still)}/{len(rows)} runs with labels still improving in their last epoch"
    return Finding("No run converged: most were still improving when training stopped.",
                   "a run is still improving if its best test accuracy is at its last epoch or its test loss "
                   "fell in the last epoch; the claim holds if more than half of the runs with labels are",
                   verdict, measured, rows)


def takeaways(runs: dict[str, Run]) -> list[Finding]:
    """The writeup's three takeaways, then its note on convergence."""
    return [check_above_chance(runs), check_augment_direction(runs), check_kmeans_flattening(runs),
            check_not_converged(runs)]


# ---------------------------------------------------------------------------------------- data

def split_counts(cfg, data) -> dict:
    """The labeled/unlabeled split a run of ``cfg`` trains on (the same seeded partition), with
    per-class counts: {"labeled": idx, "unlabeled": idx, "rows": [{class, labeled, unlabeled}, ...]}."""
    from ..data import split_indices  # torch: only the pages that load images import it

    labeled, unlabeled = split_indices(cfg, data.train.labels)
    labels = data.train.labels.numpy()
    k = data.num_classes
    lab = np.bincount(labels[labeled], minlength=k)
    unl = np.bincount(labels[unlabeled], minlength=k)
    rows = [{"class": c, "labeled": int(a), "unlabeled": int(b), "total": int(a + b)}
            for c, a, b in zip(data.classes, lab, unl)]
    return {"labeled": labeled, "unlabeled": unlabeled, "rows": rows}


# ------------------------------------------------------------------------------- augmentations

def augmentation_samples(cfg, data, num_images: int = 3, seed: int = 0):
    """``num_images`` seeded training images (float [0, 1]) with the weak and strong views the
    trainer's :class:`~ssl_lib.augment.augmenter.Augmenter` draws for them, one draw per image."""
    import torch

    from ..augment.augmenter import Augmenter, to_unit

    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.train), generator=gen)[:num_images]
    x = to_unit(data.train.images[idx])
    aug = Augmenter.from_config(cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        return x, aug.weak(x), aug.strong(x)


def repeated_views(cfg, image, repeats: int = 8, seed: int = 0) -> dict:
    """One image repeated ``repeats`` times in a single batch, through the weak and strong
    augmentations. Per-image draws give (almost surely) ``repeats`` different views; a per-batch draw,
    as in the original code, would give one."""
    import torch

    from ..augment.augmenter import Augmenter

    batch = image.unsqueeze(0).repeat(repeats, 1, 1, 1)
    aug = Augmenter.from_config(cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        weak, strong = aug.weak(batch), aug.strong(batch)

    def distinct(views) -> int:
        return len({v.numpy().tobytes() for v in views})

    return {"weak": weak, "strong": strong, "distinct_weak": distinct(weak), "distinct_strong": distinct(strong),
            "value_range": (float(min(weak.min(), strong.min())), float(max(weak.max(), strong.max())))}


# ---------------------------------------------------------------------------- original defects

#: What was wrong in the writeup's code (../shared/seed/README.md), what ssl_lib does instead, and
#: how it bears on the gap between its numbers and ours. In our words.
DEFECTS = (
    ("Device", "The GPU branch could never run (an invalid device name) and test batches were never moved "
     "to a device, so everything ran on the CPU.",
     "Device resolved once (cuda, mps or cpu) and every tensor placed on it.", "speed only"),
    ("Parameter updates", "The optimizer stepped once per epoch and only the first labeled batch of an epoch "
     "contributed its gradient: a 35-epoch run made about 35 updates.",
     "One optimizer step per iteration: hundreds per epoch.",
     "the main reason the original runs stop near 45%: they barely trained"),
    ("Stale gradients", "Unlabeled-data gradients piled up over a whole epoch without being cleared.",
     "Gradients cleared before every step.", "the few updates it made mixed an epoch of stale gradients"),
    ("Pseudo-labels", "The target was the 0/1 confidence mask instead of the predicted class, and the strong "
     "logits were indexed with that mask, so the consistency loss pushed rows 0 and 1 towards classes 0 and 1.",
     "Argmax of the weak view as target, masked per sample, averaged over the batch.",
     "its augmentation-loss curves (takeaway 2) describe a different loss"),
    ("Augmentations", "One random flip/crop/jitter per batch (not per image), applied to normalized values "
     "where colour jitter expects [0, 1].",
     "Independent draws per image, on [0, 1] images, normalized afterwards.",
     "weak and strong views were far less diverse than intended"),
    ("K-means loss memory", "Features of the whole unlabeled set were kept with their autograd graphs for one "
     "backward pass per epoch: time and memory grew with M.",
     "Centroids refit on detached features; the loss is taken per batch against them.",
     "its seconds/epoch grow with M (201 s at M=50000); ours do not"),
    ("Evaluation", "Test images were randomly flipped, the loss was summed over batches, and a helper divided "
     "correct answers by the number of batches.",
     "Un-augmented test set, mean loss per image, accuracy over images.",
     "its validation-loss scale is not comparable to ours"),
    ("Reproducibility", "The labeled/unlabeled split was not seeded and autograd anomaly detection stayed on.",
     "Seeded split, checkpoints and resume; anomaly detection off.",
     "its runs cannot be repeated exactly, and were slower"),
)
