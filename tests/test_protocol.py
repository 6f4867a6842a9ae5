"""The FixMatch protocol's profiles, paired seeds, data copy, cost and comparisons (experiments/protocol.py)."""

import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from ssl_lib import experiments as ex
from ssl_lib.config import ConfigError, make_config
from ssl_lib.data import split_indices
from ssl_lib.experiments import protocol
from ssl_lib.experiments.power import weight_study_seed as power_weight_study_seed
from ssl_lib.experiments.stats import UnpairedError


def test_the_full_profile_pre_registers_nine_pairs_at_250_labels_off_the_weight_studys_seed():
    from ssl_lib.tuning.command import resolve_base

    prof = protocol.load_protocol_profile("full")
    assert prof.main_test == 250
    assert prof.seeds("fixmatch-250") == prof.seeds("fixmatch-kmeans-250") == tuple(range(1, 10))
    assert prof.seeds("fixmatch-40") == prof.seeds("fixmatch-kmeans-40") == (1, 2, 3)
    for labels in (40, 250, 4000):  # each twin pairs with a seed of its FixMatch run
        assert prof.seeds(f"supervised-{labels}") == (1,) and 1 in prof.seeds(f"fixmatch-{labels}")
    assert len(prof.jobs) == 29 and not prof.settings
    # the seed make tune-protocol's trials train with (the study profile sets none) is not one of the plan's
    study = resolve_base(ex.configs_dir() / "protocol" / "fixmatch-kmeans-250.yaml", [], None, source={},
                         protocol_profile="study")
    assert study.seed == 0 == power_weight_study_seed()
    assert study.seed not in {seed for _, seed in prof.jobs}
    cfg = protocol.resolve_protocol("fixmatch-kmeans-250", prof, 1, source={})
    assert (cfg.steps, cfg.batch_size, cfg.unlabeled_batch_size, cfg.seed) == (2 ** 20, 64, 448, 1)


def test_a_seed_gives_both_variants_the_same_labeled_split():
    import torch

    source = {"dataset": "synthetic", "synthetic_train": 500}
    labels = torch.arange(500) % 10
    for seed in (0, 1):
        a, b = (protocol.resolve_protocol(run, "full", seed, source) for run in ("fixmatch-250", "fixmatch-kmeans-250"))
        (la, ua), (lb, ub) = split_indices(a, labels), split_indices(b, labels)
        assert np.array_equal(la, lb) and np.array_equal(ua, ub) and len(la) == 250
    other = split_indices(protocol.resolve_protocol("fixmatch-250", "full", 2, source), labels)[0]
    assert not np.array_equal(other, la)  # another seed, another split


def test_the_quick_profile_shows_the_smoke_runs():
    quick = protocol.load_protocol_profile("quick")
    smoke = protocol.load_protocol_profile("smoke")
    assert quick.jobs == smoke.jobs and protocol.runs_profile(quick) == "smoke" == protocol.runs_profile("smoke")
    assert quick.main_test == smoke.main_test == 40  # the page's verdict computed on the plumbing too


@pytest.fixture
def profiles(tmp_path, monkeypatch):
    root = tmp_path / "configs"
    shutil.copytree(ex.configs_dir() / "protocol", root / "protocol")
    monkeypatch.setenv(ex.CONFIGS_ENV, str(root))

    def write(name, text):
        (root / "protocol" / "profiles" / f"{name}.yaml").write_text(text)
        return name
    return write


@pytest.mark.parametrize("text, message", [
    ("runs: {fixmatch-40: [0, -1]}", "seeds must be lists of integers >= 0"),
    ("runs: {fixmatch-40: 3}", "seeds must be lists"),
    ("runs: {fixmatch-41: [0]}", r"unknown: \['fixmatch-41'\]"),
    ("runs: [fixmatch-40]\nseeds: [true]", "seeds must be lists"),
    ("runs: {fixmatch-40: []}", "each with at least one seed"),
    ("same_runs_as: smoke\nruns: [fixmatch-40]", "same_runs_as"),
    ("same_runs_as: nowhere", "unknown protocol profile 'nowhere'"),
    ("runs: [fixmatch-40]\nset: {stepz: 3}", "unknown config key 'stepz'"),
    ("runs: [fixmatch-40]\nextra: 1", r"unknown key\(s\) \['extra'\]"),
    ("runs: {fixmatch-40: [0, 1], fixmatch-kmeans-40: [1, 2]}\nmain_test: 40", "'main_test' must be a label count"),
    ("runs: {fixmatch-40: [0, 1], fixmatch-kmeans-40: [0, 1]}\nmain_test: 250", r"\(here: \[40\]\), got 250"),
    ("runs: {fixmatch-40: [0, 1], fixmatch-kmeans-40: [0, 1]}\nmain_test: [40]", r"got \[40\]"),
    ("runs: {fixmatch-40: [0, 1], fixmatch-kmeans-40: [0, 1]}\nmain_test: '40'", "got '40'"),
    ("same_runs_as: smoke\nmain_test: 40", "without runs, seeds, set or main_test"),
])
def test_a_bad_profile_is_named_in_one_line(profiles, text, message):
    with pytest.raises(ConfigError, match=message):
        protocol.load_protocol_profile(profiles("bad", text))


def test_the_gpu_probe_profile_is_the_250_label_pair_for_a_few_thousand_steps_at_the_protocols_batch():
    grid = protocol.protocol_grid("gpu-probe", source={})
    assert sorted(grid) == [("fixmatch-250", 0), ("fixmatch-kmeans-250", 0)]
    for (run, _), cfg in grid.items():
        assert (cfg.steps, cfg.eval_every, cfg.batch_size, cfg.unlabeled_batch_size) == (2048, 256, 64, 448)
        assert (cfg.device, cfg.precision, cfg.compile, cfg.model, cfg.num_labeled) == ("cuda", "bf16", False, "wrn28_2", 250)
        assert cfg.w_kmeans == (0.5 if "kmeans" in run else 0.0)


def test_the_epoch_table_prints_each_epochs_record_and_a_dash_where_it_has_none(tmp_path):
    import json

    from ssl_lib.engine import epochlog, steplog

    run = tmp_path / "run"
    run.mkdir()
    records = [{"epoch": 1, "seconds": 12.34, "train_seconds": 10.0, "images_per_sec": 24576.4, "kmeans_seconds": 1.25,
                "test_acc": 0.41234, "mean_mask_rate": 0.5, "grad_share_kmeans": 0.1234, "feature_spread": 4.5678},
               {"epoch": 2, "seconds": 11.0, "train_seconds": 9.5, "images_per_sec": 25000.0, "kmeans_seconds": None,
                "test_acc": 0.5, "mean_mask_rate": 0.625}]  # no refit, no diagnostics this epoch
    for record in records:
        epochlog.append(run / "epochs.jsonl", record)
    lines = protocol.epoch_table(run).splitlines()
    assert lines[0].split() == ["epoch", "seconds", "steps", "s", "img/s", "refit", "s", "test", "acc", "mask", "rate",
                                "k-means", "share", "spread"]
    assert lines[1].split() == ["1", "12.3", "10.0", "24576", "1.2", "0.4123", "0.500", "12.3%", "4.568"]
    assert lines[2].split() == ["2", "11.0", "9.5", "25000", "-", "0.5000", "0.625", "-", "-"]
    old = tmp_path / "old"  # a finished run of an older layout: the lists of metrics.json
    old.mkdir()
    (old / "metrics.json").write_text(json.dumps({"epoch": epochlog.fold(records[:1])}))
    steplog.create(old / "steps.npy")
    assert protocol.epoch_table(old).splitlines()[1] == lines[1]


def test_a_list_of_runs_takes_the_profiles_seeds(profiles):
    prof = protocol.load_protocol_profile(profiles("two", "runs: [fixmatch-40, supervised-40]\nseeds: [3, 4]"))
    assert prof.jobs == (("fixmatch-40", 3), ("fixmatch-40", 4), ("supervised-40", 3), ("supervised-40", 4))


def _run(name, seed, median, data="imagefolder /data/cifar10-jpeg (...)", steps=2, eval_every=1024, share=None, **cfg):
    config = make_config({"name": name, "seed": seed, "num_labeled": int(name.rsplit("-", 1)[1]), "eval_every": eval_every,
                          "w_kmeans": 16.0 if "kmeans" in name else 0.0, **cfg})
    epoch = {"test_acc_raw": [0.5], **({"grad_share_kmeans": [share]} if share is not None else {})}
    return SimpleNamespace(config=config, summary={"epochs": steps, "best_acc": median, "final_acc": median,
                                                   "median_last20_acc": median, "data": data},
                           epoch=lambda col: np.array(epoch.get(col, []), dtype=float))


def test_paired_rows_by_hand():
    runs = {("fixmatch-kmeans-250", 0): _run("fixmatch-kmeans-250", 0, 0.90), ("fixmatch-250", 0): _run("fixmatch-250", 0, 0.88),
            ("fixmatch-kmeans-250", 1): _run("fixmatch-kmeans-250", 1, 0.93), ("fixmatch-250", 1): _run("fixmatch-250", 1, 0.90),
            ("fixmatch-kmeans-250", 2): _run("fixmatch-kmeans-250", 2, 0.91), ("fixmatch-250", 2): _run("fixmatch-250", 2, 0.90),
            ("fixmatch-kmeans-40", 0): _run("fixmatch-kmeans-40", 0, 0.5)}  # no fixmatch-40 to pair with
    (row,) = protocol.paired_rows(runs)
    # differences 0.02, 0.03, 0.01: mean 0.02, sd 0.01, t(0.975, 2) = 4.3027 -> half width 0.02484
    assert row["labels"] == 250 and row["seeds"] == "0, 1, 2"
    assert row["difference"] == pytest.approx(0.02) and row["95% CI low"] == pytest.approx(0.02 - 0.024841, abs=1e-5)
    assert row["fixmatch-kmeans mean"] == pytest.approx(0.9133333) and row["fixmatch sd"] == pytest.approx(0.011547, abs=1e-6)
    assert "not shown at this budget" in row["verdict"] and row["p (Holm)"] == pytest.approx(0.07418, abs=1e-5)  # t = 3.464, 2 df
    runs[("fixmatch-250", 1)] = _run("fixmatch-250", 1, 0.91)  # differences 0.02, 0.02, 0.01: t = 5, p = 0.0377
    assert protocol.paired_rows(runs)[0]["verdict"].startswith("fixmatch-kmeans minus fixmatch, 250 labels: yes")
    del runs[("fixmatch-250", 2)]  # seed 2 of one side only: an error naming it, not a pair silently dropped
    with pytest.raises(UnpairedError, match="seed 2 has fixmatch-kmeans-250 but not fixmatch-250"):
        protocol.paired_rows(runs)
    (row,) = protocol.paired_rows(runs, common_seeds=True)  # asked for: the seeds both have, said in the row
    assert row["seeds"] == "0, 1" and row["difference"] == pytest.approx(0.02)


def test_the_data_copy_and_what_keeps_a_run_from_the_papers_table():
    full = dict(steps=1024, eval_every=1024)  # 1,024 evaluations of 1,024 steps = 2^20
    release = _run("fixmatch-250", 0, 0.9, data="torchvision CIFAR-10 at data (...)", batch_size=64,
                   unlabeled_batch_size=448, **full)
    assert protocol.beside_the_paper(release.config, release.summary) == "yes"
    jpeg = _run("fixmatch-250", 0, 0.9, batch_size=64, unlabeled_batch_size=448, **full)
    assert protocol.beside_the_paper(jpeg.config, jpeg.summary) == \
        "no: image-folder copy of CIFAR-10 (not the release; a JPEG copy is lossy)"
    short = _run("fixmatch-250", 0, 0.9, data="torchvision CIFAR-10 at data", steps=16, test_subset=5000)
    assert protocol.beside_the_paper(short.config, short.summary) == \
        "no: 1.56% of the schedule at a smaller batch; 5000 test images"
    (row,) = protocol.rows({("fixmatch-kmeans-250", 0): _run("fixmatch-kmeans-250", 0, 0.9, share=0.2)})
    assert row["k-means share of the gradient (last)"] == 0.2 and row["w_kmeans"] == 16.0
    assert row["data"].startswith("image-folder copy") and row["beside the paper"].startswith("no: image-folder")


def test_gpu_hours_by_hand():
    # 29 runs of 2^20 steps of the full batch at 20 ms: 2^20 * 0.02 / 3600 = 5.825 h each
    cost = protocol.gpu_hours("full", 0.02)
    per_run = 2 ** 20 * 0.02 / 3600
    assert cost[0] == {"run": "fixmatch-250", "seeds": 9, "steps": 2 ** 20, "GPU-hours per run": pytest.approx(per_run),
                       "GPU-hours": pytest.approx(9 * per_run)}
    assert cost[-1]["run"] == "total" and cost[-1]["GPU-hours"] == pytest.approx(29 * per_run)


def test_seconds_per_step_from_a_gpu_bench_of_a_protocol_config_else_the_estimate():
    assumed, where = protocol.seconds_per_step(None)
    assert assumed == pytest.approx(6 * 3600 / 2 ** 20) and "estimate" in where
    bench = {"machine": {"device": "cuda:0", "device_name": "NVIDIA H100"}, "full": {"ms_per_iter": 10.0},
             "config": {"model": "wrn28_2", "batch_size": 16, "unlabeled_batch_size": 112, "precision": "bf16",
                        "compile": True}}
    seconds, where = protocol.seconds_per_step(bench)
    assert seconds == pytest.approx(0.010 * 512 / 128) and "NVIDIA H100" in where  # scaled to the full batch
    cpu = {**bench, "machine": {"device": "cpu"}}
    assert protocol.seconds_per_step(cpu)[0] == assumed  # a CPU bench says nothing about a GPU


def test_the_protocol_study_runs_at_its_cpu_size_and_records_the_gradient_share(tmp_path):
    import json

    from ssl_lib import cli

    out = tmp_path / "study"
    argv = ["tune", "--config", str(ex.configs_dir() / "protocol" / "fixmatch-kmeans-250.yaml"),
            "--space", str(ex.configs_dir() / "protocol" / "tuning" / "w_kmeans.yaml"),
            "--protocol-profile", "study-cpu", "--trials", "2", "--no-final", "--quiet", "--out", str(out)]
    assert cli.main(argv) == 0
    study = json.loads((out / "study.json").read_text())
    first, second = study["trials"]
    assert first["w_kmeans"] == 0.5 and 0.125 <= second["w_kmeans"] <= 4.0  # the configs' weight first, then TPE
    assert all(0 < t["grad_share_kmeans"] < 1 for t in study["trials"])
    assert study["val_size"] == 60 and study["final"] is None
    best = (out / "best.yaml").read_text()
    assert "val_size: 0" in best and "model: wrn28_2" in best and "steps: 4" in best


def test_tune_refuses_both_profiles_and_a_protocol_profile_without_a_config(tmp_path, capsys):
    from ssl_lib import cli

    space = str(ex.configs_dir() / "protocol" / "tuning" / "w_kmeans.yaml")
    assert cli.main(["tune", "--space", space, "--protocol-profile", "study-cpu", "--out", str(tmp_path / "a")]) == 2
    assert "--protocol-profile needs --config" in capsys.readouterr().err
    assert cli.main(["tune", "--config", "configs/protocol/fixmatch-kmeans-250.yaml", "--space", space,
                     "--protocol-profile", "study-cpu", "--profile", "smoke", "--out", str(tmp_path / "b")]) == 2
    assert "not both" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_power_table_from_the_papers_spread_then_from_measured_pairs():
    from ssl_lib.experiments import power

    table = power.power_rows("full", None, 0.02)
    per_pair = 2 * 2 ** 20 * 0.02 / 3600  # both runs of a pair, 2^20 steps at 20 ms
    rows = {(r["labels"], r["σ_d from"].split(", ")[-1]): r for r in table}
    independent, correlated = rows[(250, "independent runs (σ_d = σ·√2)")], rows[(250, "correlation 0.5 (σ_d = σ)")]
    assert independent["σ_d (points)"] == pytest.approx(0.65 * math.sqrt(2)) and correlated["σ_d (points)"] == 0.65
    assert independent["pairs for 80% power"] == 9 and correlated["pairs for 80% power"] == 6
    assert independent["GPU-hours of those pairs"] == pytest.approx(9 * per_pair)
    assert independent["pairs in the plan"] == 9 and independent["power of the plan's pairs"] >= 0.8
    assert rows[(40, "independent runs (σ_d = σ·√2)")]["power of the plan's pairs"] < 0.1  # 3 pairs at 40 labels
    assert rows[(4000, "correlation 0.5 (σ_d = σ)")]["pairs in the plan"] == 1
    assert rows[(4000, "correlation 0.5 (σ_d = σ)")]["power of the plan's pairs"] == 0  # one pair: no test
    assert len(table) == 6

    # three seed pairs at 250 labels replace the paper's spread there (differences 2, 3, 1 points: sd 1
    # point, which needs 10 pairs at 1 point); two at 40 labels do not
    runs = {(f"{side}-250", seed): _run(f"{side}-250", seed, acc) for seed, accs in enumerate([(0.90, 0.88), (0.93, 0.90),
                                                                                              (0.91, 0.90)])
            for side, acc in zip(("fixmatch-kmeans", "fixmatch"), accs)}
    runs.update({(f"{side}-40", s): _run(f"{side}-40", s, 0.5 + s / 10) for s in (0, 1) for side in ("fixmatch", "fixmatch-kmeans")})
    (measured,) = [r for r in power.power_rows("full", runs, 0.02) if r["labels"] == 250]
    assert measured["σ_d from"] == "measured: sd of 3 seed-paired differences (seeds 0, 1, 2)"
    assert measured["σ_d (points)"] == pytest.approx(1.0) and measured["pairs for 80% power"] == 10
    assert len([r for r in power.power_rows("full", runs, 0.02) if r["labels"] == 40]) == 2


def test_the_plan_says_what_it_tests_and_the_pages_verdicts_follow_it():
    from ssl_lib.experiments import power

    full = protocol.load_protocol_profile("full")
    text = power.plan_summary(full, power.power_rows(full))
    assert "**Main test, pre-registered: 250 labels**" in text and "9 seed pairs (seeds 1, 2, 3, 4, 5, 6, 7, 8, 9)" in text
    assert "power 81% to 98%" in text and "40 labels: 3 seed pairs (seeds 1, 2, 3), power 6%" in text
    assert "**no verdict**" in text and "seed 0: the plan does not use it" in text and "Only the k-means side" in text
    smoke = protocol.load_protocol_profile("smoke")
    assert "**the plan uses it too**" in power.plan_summary(smoke, power.power_rows(smoke))
    gains = {40: (0.05, 0.052, 0.049), 250: (0.02, 0.022, 0.019)}  # k-means minus FixMatch, seeds 1, 2, 3
    runs = {}
    for n, base in ((40, 0.5), (250, 0.9)):
        for seed, gain in zip((1, 2, 3), gains[n]):
            runs[f"fixmatch-{n}", seed] = _run(f"fixmatch-{n}", seed, base)
            runs[f"fixmatch-kmeans-{n}", seed] = _run(f"fixmatch-kmeans-{n}", seed, base + gain)
    rows = protocol.paired_rows(runs, judged=(250,))  # only the main test is judged: a family of one
    assert rows[0]["verdict"] == "40 labels: mean ± sd only, no verdict (not the pre-registered test)."
    assert rows[0]["p (Holm)"] is None and rows[1]["p (Holm)"] < 0.05
    assert "after Holm" not in rows[1]["verdict"] and rows[1]["verdict"].startswith("fixmatch-kmeans minus fixmatch, 250 labels: yes")
    both = protocol.paired_rows(runs)
    assert "after Holm's correction over 2 verdicts" in both[1]["verdict"]
