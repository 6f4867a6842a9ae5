import json
import subprocess
import sys

import pytest

from ssl_lib.cli import main

SMALL = ["--set", "dataset=synthetic", "--set", "synthetic_train=300", "--set", "synthetic_test=100",
         "--set", "num_unlabeled=100", "--set", "epochs=1", "--set", "max_iters_per_epoch=3",
         "--set", "kmeans_n_init=1"]


def _run(*args):
    return subprocess.run([sys.executable, "-m", "ssl_lib", *args], capture_output=True, text=True)


def test_help_lists_commands_and_every_config_field():
    from ssl_lib.config import _DEFAULTS, FIELD_HELP

    out = _run("--help")
    commands = ("train", "evaluate", "bench", "accuracy", "gpu-check", "experiments", "report")
    assert out.returncode == 0 and all(c in out.stdout for c in commands)
    text = _run("train", "--help").stdout
    assert "--resume" in text
    rows = {line.split()[0]: line for line in text.split("config fields")[1].splitlines()[1:] if line.strip()}
    assert set(rows) == set(FIELD_HELP)  # every field, nothing else
    for key, help_text in FIELD_HELP.items():
        assert help_text and help_text in rows[key] and repr(_DEFAULTS[key]) in rows[key], key
    assert "list" in _run("experiments", "--help").stdout and "index" in _run("report", "--help").stdout


@pytest.mark.parametrize("args, message", [
    (["--set", "w_kmean=1"], "unknown config key 'w_kmean'; did you mean 'w_kmeans'?"),
    (["--set", "tau=2"], "config field 'tau' must be in [0, 1]"),
    (["--set", "num_unlabeled=100000"], "num_unlabeled must be in [0, 300]"),
    (["--set", "dataset=imagefolder", "--set", "data_root=/nonexistent/images"], "/nonexistent/images"),
])
def test_bad_input_exits_2_with_one_line_and_no_run_dir(tmp_path, args, message, capsys):
    out_dir = tmp_path / "run"
    code = main(["train", *SMALL, *args, "--out", str(out_dir), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out_dir.exists()


def test_missing_config_file_exits_2(tmp_path):
    out = _run("train", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "r"))
    assert out.returncode == 2 and "nope.yaml does not exist" in out.stderr and "Traceback" not in out.stderr


def test_train_then_evaluate_agree(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *SMALL, "--out", str(run), "--quiet"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test_acc"] == pytest.approx(summary["final_acc"])
    assert main(["evaluate", str(tmp_path)]) == 2  # not a run directory


def test_corrupt_image_exits_2_naming_the_file(tmp_path, capsys):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("a", "b"):
            folder = tmp_path / "img" / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.png")
    bad = tmp_path / "img" / "train" / "b" / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    code = main(["train", "--set", "dataset=imagefolder", "--set", f"data_root={tmp_path / 'img'}",
                 "--set", "num_unlabeled=2", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "broken.jpg" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
