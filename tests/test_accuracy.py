import json

import pytest

from ssl_lib.tools.accuracy import paired, run_seeds
from ssl_lib.cli import main
from ssl_lib.config import ConfigError, make_config

TINY = {"dataset": "synthetic", "synthetic_train": 200, "synthetic_test": 100, "num_unlabeled": 100, "epochs": 1,
        "max_iters_per_epoch": 3, "batch_size": 16, "unlabeled_batch_size": 16, "kmeans_n_init": 1,
        "eval_batch_size": 100, "device": "cpu"}


def test_paired_differences_by_seed():
    after = {"runs": [{"seed": 0, "final_acc": 0.5}, {"seed": 1, "final_acc": 0.6}]}
    before = {"runs": [{"seed": 2, "final_acc": 0.1}, {"seed": 1, "final_acc": 0.7}, {"seed": 0, "final_acc": 0.4}]}
    p = paired(after, before)
    assert p["seeds"] == [0, 1]
    assert p["differences"] == pytest.approx([0.1, -0.1])
    assert p["mean"] == pytest.approx(0.0, abs=1e-12)
    assert p["standard_error"] == pytest.approx(0.1)  # sd sqrt(0.02) over sqrt(2)
    with pytest.raises(ConfigError, match="no seed in common"):
        paired(after, {"runs": [{"seed": 9, "final_acc": 0.3}]})


def test_same_config_same_seeds_pair_to_exactly_zero(tmp_path, capsys):
    # Training is deterministic on the CPU: a second check of the same config differs by nothing.
    cfg = make_config(TINY)
    first = run_seeds(cfg, [0, 1], tmp_path / "a.json")
    accs = [r["final_acc"] for r in first["runs"]]
    assert first["final_acc"]["mean"] == pytest.approx(sum(accs) / 2)
    assert "seed" not in first["config"] and json.loads((tmp_path / "a.json").read_text())["runs"] == first["runs"]
    second = run_seeds(cfg, [1, 0], tmp_path / "b.json", compare=tmp_path / "a.json")
    c = second["compared_with"]
    assert c["final_acc"]["differences"] == [0.0, 0.0] and c["config_differences"] == {}
    assert "+0.00 +- 0.00 points" in capsys.readouterr().out


def test_cli_refuses_a_bad_comparison_before_training(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a check"}')
    out = tmp_path / "out.json"
    args = ["accuracy", "--out", str(out), "--compare", str(bad), "--seeds", "0"]
    for key, value in TINY.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 2
    assert "not an accuracy check" in capsys.readouterr().err and not out.exists()
    assert main(args[:3] + ["--compare", str(tmp_path / "missing.json")] + args[5:]) == 2
