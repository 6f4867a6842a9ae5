"""The standard FixMatch protocol beside the writeup's grid: ``configs/protocol/<run>.yaml`` (40, 250
and 4,000 labels; FixMatch, FixMatch with the k-means term, and a supervised-only twin), run under
a protocol profile ``configs/protocol/profiles/<name>.yaml``:

    description   one line for the report
    runs          which of the runs the profile trains: a list (each with ``seeds``), or a mapping
                  run -> its seeds (the full profile: 9 seed pairs at 250 labels, 3 at 40, 1 run of
                  each twin and at 4,000 labels)
    seeds         the seeds of the runs listed without their own (default [0])
    set           config fields applied on top of every run (the budget: steps, batch sizes, ...)
    tune_trials   finished trials of a study on this profile (``tune --protocol-profile``; the
                  protocol study of configs/protocol/tuning/)
    main_test     the label count of the pre-registered comparison (FixMatch + k-means against
                  FixMatch, paired by seed): the page gives a verdict there only; the other label
                  counts get their means and sds (experiments/power.py says why)
    same_runs_as  instead of runs and set: show another profile's runs (the quick profile shows the
                  smoke profile's, the plumbing, since no budget of the 2-core CPU shows FixMatch at work)

A seed fixes the labeled split, the initialisation, the batch order and the views' random draws, so
the same seed of two variants (fixmatch-250 and fixmatch-kmeans-250) is a paired comparison.

A resolved config is: the run's YAML < the data source (as for the grid) < the profile's ``set``
< the seed. Runs are cached by config hash under ``<runs root>/protocol-<profile>/``, like the grid's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config, ConfigError, make_config
from .grid import _absolute, _read_yaml, configs_dir, data_source
from .stats import judge, mean_sd, paired_t

#: FixMatch (RandAugment) test accuracy on CIFAR-10 in the paper (Sohn et al. 2020, Table 2):
#: mean and standard deviation over 5 folds, by label count.
PAPER = {40: (0.8619, 0.0337), 250: (0.9493, 0.0065), 4000: (0.9574, 0.0005)}
#: The range the best public reimplementations report (TorchSSL; kekmodel/FixMatch-pytorch), by label count.
REIMPLEMENTATIONS = {40: (0.925, 0.936), 250: (0.951, 0.953), 4000: (0.958, 0.958)}
#: The protocol's full schedule, in steps, and its batch (labeled + unlabeled images per step).
FULL_STEPS = 2 ** 20
FULL_BATCH = (64, 448)
#: Seconds per protocol step on one GPU assumed for the cost of a profile until ``make bench`` has
#: measured one (see :func:`seconds_per_step`): about 6 hours for 2^20 steps on one A100, the order of
#: the reference implementations (kekmodel/FixMatch-pytorch, TorchSSL). An estimate, not a measurement.
ASSUMED_GPU_SECONDS_PER_STEP = 6 * 3600 / FULL_STEPS


@dataclass(frozen=True)
class ProtocolProfile:
    name: str
    description: str
    jobs: tuple[tuple[str, int], ...]  # (run, seed), in the profile's order
    settings: dict = field(default_factory=dict)
    same_runs_as: str | None = None  # the profile whose runs this one shows (it trains none of its own)
    tune_trials: int | None = None  # finished trials of a study on this profile
    main_test: int | None = None  # the label count of the pre-registered k-means comparison

    @property
    def runs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(run for run, _ in self.jobs))

    def seeds(self, run: str) -> tuple[int, ...]:
        return tuple(seed for r, seed in self.jobs if r == run)


def protocol_dir() -> Path:
    return configs_dir() / "protocol"


def protocol_runs() -> list[str]:
    return sorted(p.stem for p in protocol_dir().glob("*.yaml"))


def load_protocol_profile(name: str) -> ProtocolProfile:
    path = protocol_dir() / "profiles" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (protocol_dir() / "profiles").glob("*.yaml")))
        raise ConfigError(f"unknown protocol profile {name!r}; profiles: {known}")
    raw = _read_yaml(path)
    unknown = set(raw) - {"description", "runs", "seeds", "set", "same_runs_as", "tune_trials", "main_test"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; expected description, runs, seeds, set, "
                          "tune_trials, main_test, same_runs_as")
    trials = raw.get("tune_trials")
    if trials is not None and (isinstance(trials, bool) or not isinstance(trials, int) or trials < 1):
        raise ConfigError(f"{path}: 'tune_trials' must be an integer >= 1, got {trials!r}")
    description = str(raw.get("description", ""))
    if raw.get("same_runs_as") is not None:
        other = raw["same_runs_as"]
        if set(raw) & {"runs", "seeds", "set", "main_test"} or other == name:
            raise ConfigError(f"{path}: 'same_runs_as' names another profile and comes without runs, seeds, set "
                              "or main_test")
        shown = load_protocol_profile(str(other))
        return ProtocolProfile(name, description, shown.jobs, shown.settings, shown.same_runs_as or shown.name,
                               main_test=shown.main_test)
    runs, seeds, settings = raw.get("runs") or [], raw.get("seeds") or [0], raw.get("set") or {}
    seed_lists = list(runs.values()) if isinstance(runs, dict) else [seeds]
    if not all(isinstance(lst, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in lst)
               for lst in seed_lists):
        raise ConfigError(f"{path}: seeds must be lists of integers >= 0, got {seed_lists!r}")
    jobs = ([(run, seed) for run, run_seeds in runs.items() for seed in run_seeds] if isinstance(runs, dict)
            else [(run, seed) for run in runs for seed in seeds])
    missing = [r for r in dict.fromkeys(run for run, _ in jobs) if r not in protocol_runs()]
    if missing or not jobs or (isinstance(runs, dict) and not all(runs.values())):
        raise ConfigError(f"{path}: 'runs' must list runs of {protocol_dir()}, each with at least one seed "
                          f"(unknown: {missing})")
    if not isinstance(settings, dict):
        raise ConfigError(f"{path}: 'set' must be a mapping of config fields")
    make_config(settings)  # unknown or invalid fields named now
    main = raw.get("main_test")
    if main is not None:
        paired = {n for n in PAPER
                  if len({s for r, s in jobs if r == f"fixmatch-{n}"} & {s for r, s in jobs if r == f"fixmatch-kmeans-{n}"}) >= 2}
        if isinstance(main, bool) or not isinstance(main, int) or main not in paired:
            raise ConfigError(f"{path}: 'main_test' must be a label count at which the profile pairs fixmatch-<labels> "
                              f"with fixmatch-kmeans-<labels> on 2 or more seeds (here: {sorted(paired)}), got {main!r}")
    return ProtocolProfile(name, description, tuple(jobs), dict(settings), tune_trials=trials, main_test=main)


def resolve_protocol(run: str, profile: str | ProtocolProfile, seed: int = 0, source: dict | None = None) -> Config:
    """The exact config of protocol ``run`` under ``profile`` with ``seed``."""
    path = protocol_dir() / f"{run}.yaml"
    if not path.is_file():
        raise ConfigError(f"no protocol config {path} (runs: {', '.join(protocol_runs())})")
    return resolve_file(path, profile, {"seed": seed}, source)


def resolve_file(path: Path, profile: str | ProtocolProfile, overrides: dict | None = None,
                 source: dict | None = None) -> Config:
    """A config file under a protocol profile: the file < the data source < the profile's ``set`` <
    ``overrides``."""
    prof = profile if isinstance(profile, ProtocolProfile) else load_protocol_profile(profile)
    merged = {**_read_yaml(Path(path)), **(source if source is not None else data_source()), **prof.settings,
              **(overrides or {})}
    for key in ("data_root", "cache_dir"):
        if merged.get(key):
            merged[key] = _absolute(str(merged[key]))
    return make_config(merged)


def protocol_grid(profile: str | ProtocolProfile, source: dict | None = None) -> dict[tuple[str, int], Config]:
    prof = profile if isinstance(profile, ProtocolProfile) else load_protocol_profile(profile)
    return {(run, seed): resolve_protocol(run, prof, seed, source) for run, seed in prof.jobs}


def runs_profile(profile: str | ProtocolProfile) -> str:
    """The profile whose runs ``profile`` shows (its own name, unless it is ``same_runs_as`` another):
    their runs root is ``protocol-<that name>``."""
    prof = profile if isinstance(profile, ProtocolProfile) else load_protocol_profile(profile)
    return prof.same_runs_as or prof.name


def labels_of(cfg: Config) -> int:
    return int(cfg.num_labeled or 0)


def variant(cfg: Config) -> str:
    if cfg.w_augment == 0 and cfg.w_kmeans == 0:
        return "supervised only"
    return "FixMatch + k-means" if cfg.w_kmeans > 0 else "FixMatch"


def data_copy(summary: dict) -> str:
    """Which CIFAR-10 copy a run trained on, from its summary's data description."""
    d = summary.get("data", "")
    if d.startswith("torchvision CIFAR-10"):
        return "CIFAR-10, torchvision release"
    if d.startswith("imagefolder"):
        return "image-folder copy of CIFAR-10 (not the release; a JPEG copy is lossy)"
    if d.startswith("synthetic"):
        return "synthetic images (checks the plumbing only)"
    return d or "unknown"


def beside_the_paper(cfg: Config, summary: dict) -> str:
    """'yes' when a run is comparable with the paper's table (the torchvision release, the whole
    schedule at the whole batch, the whole test set); else what differs."""
    why = []
    if not summary.get("data", "").startswith("torchvision CIFAR-10"):
        why.append(data_copy(summary))
    steps = summary["epochs"] * cfg.eval_every if cfg.eval_every else None
    if steps != FULL_STEPS or (cfg.batch_size, cfg.unlabeled_batch_size) != FULL_BATCH:
        why.append("not the whole schedule" if steps is None else f"{steps / FULL_STEPS:.2%} of the schedule"
                   + ("" if (cfg.batch_size, cfg.unlabeled_batch_size) == FULL_BATCH else " at a smaller batch"))
    if cfg.test_subset:
        why.append(f"{cfg.test_subset} test images")
    return "yes" if not why else "no: " + "; ".join(why)


#: A run's epochs as a first GPU session reads them (``experiments protocol PROFILE --epochs``):
#: heading, record key, format.
EPOCH_COLUMNS = (("epoch", "epoch", "{:d}"), ("seconds", "seconds", "{:.1f}"), ("steps s", "train_seconds", "{:.1f}"),
                 ("img/s", "images_per_sec", "{:.0f}"), ("refit s", "kmeans_seconds", "{:.1f}"),
                 ("test acc", "test_acc", "{:.4f}"), ("mask rate", "mean_mask_rate", "{:.3f}"),
                 ("k-means share", "grad_share_kmeans", "{:.1%}"), ("spread", "feature_spread", "{:.3f}"))


def epoch_table(run_dir: str | Path) -> str:
    """One line per epoch of a run (its epoch log's records; an older run's lists): seconds, the
    steps' share of them, images/s, the refit's seconds, test accuracy, mask rate, the k-means
    term's share of the gradient and the features' spread at the refit ("-" where the epoch did not
    record one)."""
    from ..engine import epochlog, rundir

    path = Path(run_dir) / rundir.EPOCHS
    records = epochlog.read(path) if path.is_file() else epochlog.unfold(rundir.read_metrics(run_dir)["epoch"])
    widths = [max(len(head), 8) for head, _, _ in EPOCH_COLUMNS]
    lines = ["  ".join(head.rjust(w) for (head, _, _), w in zip(EPOCH_COLUMNS, widths))]
    for record in records:
        cells = [(fmt.format(record[key]) if record.get(key) is not None else "-") for _, key, fmt in EPOCH_COLUMNS]
        lines.append("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    return "\n".join(lines)


#: the columns of :func:`rows` a table shows for every run, even where all runs agree (the others,
#: the setting, are said once above the table when all runs share them: ``report.split_common``)
PER_RUN_COLUMNS = ("run", "seed", "variant", "w_kmeans", "best acc", "median of last 20", "final acc",
                   "final acc (raw weights)", "k-means share of the gradient (last)")


def rows(runs: dict) -> list[dict]:
    """One row per finished run (``{(run, seed): Run}``): our accuracies, the budget and the data copy
    they came from, the k-means term's share of the gradient, and the paper's and the
    reimplementations' figures at the same label count."""
    out = []
    for (name, seed), run in runs.items():
        cfg, s = run.config, run.summary
        steps = s["epochs"] * cfg.eval_every if cfg.eval_every else None
        labels = labels_of(cfg)
        paper = PAPER.get(labels)
        lo, hi = REIMPLEMENTATIONS.get(labels, (None, None))
        share = run.epoch("grad_share_kmeans")
        out.append({
            "run": name, "labels": labels, "variant": variant(cfg), "seed": seed, "w_kmeans": cfg.w_kmeans,
            "steps": steps, "of the schedule": None if steps is None else steps / FULL_STEPS,
            "batch (labeled + unlabeled)": f"{cfg.batch_size} + {cfg.unlabeled_batch_size}",
            "best acc": s["best_acc"], "median of last 20": s.get("median_last20_acc"), "final acc": s["final_acc"],
            "final acc (raw weights)": run.epoch("test_acc_raw")[-1] if len(run.epoch("test_acc_raw")) else None,
            "k-means share of the gradient (last)": float(share[-1]) if len(share) else None,
            "data": data_copy(s), "beside the paper": beside_the_paper(cfg, s),
            "paper (FixMatch RA)": None if paper is None else paper[0],
            "reimplementations": None if lo is None else (f"{lo:.3f}" if lo == hi else f"{lo:.3f}-{hi:.3f}"),
        })
    return out


def paired_rows(runs: dict, first: str = "fixmatch-kmeans", second: str = "fixmatch",
                metric: str = "median_last20_acc", level: float = 0.95, common_seeds: bool = False,
                judged: tuple[int, ...] | None = None) -> list[dict]:
    """``first`` against ``second`` at each label count where both ran (e.g. fixmatch-kmeans-250
    against fixmatch-250): mean and sd over seeds of each, and the difference paired by seed with its
    Student-t interval at ``level`` and a one-line verdict, the verdicts of the table corrected
    together (Holm). A seed one side has and the other lacks is an error naming it, unless
    ``common_seeds`` asks for the seeds both have (a side run on fewer seeds by design, as the
    supervised twins are: the row's seeds say which). With ``judged`` (label counts: a profile's
    pre-registered main test) only those rows get a verdict and enter the correction; the others
    are means and sds."""
    labels = sorted({labels_of(r.config) for r in runs.values()})
    compared = {}
    for n in labels:
        a = {seed: r.summary[metric] for (name, seed), r in runs.items() if name == f"{first}-{n}"}
        b = {seed: r.summary[metric] for (name, seed), r in runs.items() if name == f"{second}-{n}"}
        if common_seeds:
            a, b = ({s: v for s, v in side.items() if s in a and s in b} for side in (a, b))
        if a and b:
            compared[n] = (a, b, paired_t(a, b, level, names=(f"{first}-{n}", f"{second}-{n}")))
    tested = [n for n in compared if judged is None or n in judged]
    verdicts = dict(zip(tested, judge({f"{first} minus {second}, {n} labels": compared[n][2] for n in tested}).values()))
    out = []
    for n, (a, b, c) in compared.items():
        c = verdicts.get(n) or {**c, "p_holm": None,
                                "verdict": f"{n} labels: mean ± sd only, no verdict (not the pre-registered test)."}
        (mx, sx), (my, sy) = mean_sd(a.values()), mean_sd(b.values())
        out.append({"labels": n, "seeds": ", ".join(map(str, c["keys"])), f"{first} mean": mx, f"{first} sd": sx,
                    f"{second} mean": my, f"{second} sd": sy, "difference": c["mean"],
                    f"{level:.0%} CI low": c["low"], f"{level:.0%} CI high": c["high"],
                    "p (Holm)": c["p_holm"], "verdict": c["verdict"]})
    return out


def seconds_per_step(bench: dict | None) -> tuple[float, str]:
    """Seconds per protocol step on one GPU and where the figure comes from: a bench of a protocol
    config on a CUDA device (``make bench CONFIG=configs/protocol/... BENCH_ARGS="--set device=cuda
    ..."``'s JSON), else :data:`ASSUMED_GPU_SECONDS_PER_STEP` (an estimate)."""
    machine, cfg = (bench or {}).get("machine", {}), (bench or {}).get("config", {})
    if str(machine.get("device", "")).startswith("cuda") and cfg.get("model") == "wrn28_2":
        scale = sum(FULL_BATCH) / (cfg["batch_size"] + cfg["unlabeled_batch_size"])  # time grows with the batch
        return (bench["full"]["ms_per_iter"] / 1e3 * scale,
                f"measured by the bench on {machine.get('device_name', machine['device'])} ({cfg.get('precision')}, "
                f"compile {'on' if cfg.get('compile') else 'off'})")
    return ASSUMED_GPU_SECONDS_PER_STEP, "an estimate (about 6 h per 2^20 steps on one A100), not measured here"


def gpu_hours(profile: str | ProtocolProfile, seconds: float) -> list[dict]:
    """What a profile's runs cost on one GPU at ``seconds`` per step: one row per run and seed count,
    and a total."""
    prof = profile if isinstance(profile, ProtocolProfile) else load_protocol_profile(profile)
    out = []
    for run in prof.runs:
        cfg = resolve_protocol(run, prof, 0, source={})
        seeds = prof.seeds(run)
        scale = (cfg.batch_size + cfg.unlabeled_batch_size) / sum(FULL_BATCH)
        hours = cfg.steps * seconds * scale / 3600 if cfg.steps else None
        out.append({"run": run, "seeds": len(seeds), "steps": cfg.steps, "GPU-hours per run": hours,
                    "GPU-hours": None if hours is None else hours * len(seeds)})
    total = sum(r["GPU-hours"] or 0 for r in out)
    out.append({"run": "total", "seeds": sum(r["seeds"] for r in out), "steps": None, "GPU-hours per run": None,
                "GPU-hours": total})
    return out
