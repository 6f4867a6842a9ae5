"""The GPU check: its CUDA checks (run where CUDA is present), and its whole flow on the CPU, from
the source tree, with the notebook and test tools made unimportable (a GPU machine may have none)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssl_lib.cli import main
from ssl_lib.config import ConfigError, load_config
from ssl_lib.data import DataError
from ssl_lib.tools import gpu_check
from ssl_lib.tools.gpu_check import (GpuCheckFailed, check_compiled_step, check_eval_matches_cpu, check_kmeans,
                                     check_no_host_sync, clustered_features, format_table, run_gpu_check)

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ------------------------------------------------------------------------ the CUDA checks

@cuda
def test_cuda_steps_make_no_host_sync():
    # PyTorch raises on any synchronising call (.item(), nonzero, a blocking host-to-device copy
    # of a tensor made per step, ...) in three bf16 steps after a warm-up step
    assert check_no_host_sync("cuda")["sync_debug"] == "error"


@cuda
def test_cuda_compiled_bf16_steps_are_finite_and_match_eager():
    assert check_compiled_step("cuda", steps=5)["compile"] is True


@cuda
def test_cuda_evaluation_matches_the_cpu():
    check_eval_matches_cpu("cuda")


@cuda
def test_cuda_kmeans_matches_scikit_learn():
    result = check_kmeans(clustered_features(20_000), device="cuda")
    assert result["device"].startswith("cuda") and result["torch_s"] > 0


# ---------------------------------------------------------------------- on this machine

def test_checks_run_on_the_cpu_and_kmeans_fails_loudly():
    ev = check_eval_matches_cpu("cpu")
    assert ev["fp32"]["disagree"] == 0 and ev["fp32"]["loss_rel_diff"] < 1e-5  # only the memory format differs
    features = clustered_features(2000, seed=1)
    km = check_kmeans(features, device="cpu", seeds=3)
    assert km["inertia_ratio"] <= 1.01 and len(km["torch_inertias"]) == len(km["sklearn_inertias"]) == 3
    assert km["torch_inertia"] == pytest.approx(sum(km["torch_inertias"]) / 3)  # judged on the mean of the seeds
    assert km["inertia_ratio"] == pytest.approx(km["torch_inertia"] / km["sklearn_inertia"])
    with pytest.raises(GpuCheckFailed, match="k-means: torch inertia"):
        check_kmeans(features, device="cpu", max_ratio=0.5)


def test_gpu_check_without_cuda_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="^gpu-check needs a CUDA device; "):
        run_gpu_check(tmp_path / "g.json")
    assert main(["gpu-check", "--out", str(tmp_path / "g.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: gpu-check needs a CUDA device") and err.count("\n") == 1
    assert not (tmp_path / "g.json").exists()


# Nothing the check imports may need these: a GPU machine may have only torch, torchvision,
# numpy, scikit-learn, scipy, matplotlib, tqdm and pyyaml.
FORBIDDEN = ("pytest", "_pytest", "pluggy", "papermill", "nbformat", "nbconvert", "nbval", "optuna", "jupyter",
             "jupyter_client", "jupyter_core", "ipykernel", "IPython", "ipywidgets")

PROBE = """
import importlib.abc, json, sys

forbidden, out = set(json.loads(sys.argv[1])), sys.argv[2]
attempts = []

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in forbidden:
            attempts.append(name)
            raise ModuleNotFoundError(f"blocked: {name}", name=name)
        return None

sys.meta_path.insert(0, Block())
from ssl_lib.tools.gpu_check import run_gpu_check

run_gpu_check(out, device="cpu", quick=True, profile="smoke", epochs=1)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in forbidden)
print("PROBE " + json.dumps({"attempts": attempts, "loaded": loaded, "file": sys.modules["ssl_lib"].__file__}))
"""


def _source_tree_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "OMP_WAIT_POLICY": "PASSIVE"}


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """The whole check on the CPU (synthetic data, tiny budgets), once, in a fresh process."""
    tmp = tmp_path_factory.mktemp("gpu-check")
    out = tmp / "bench" / "gpu-check.json"
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(FORBIDDEN), str(out)], cwd=tmp,
                          env=_source_tree_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = json.loads(proc.stdout.split("PROBE ", 1)[1])
    return json.loads(out.read_text()), proc.stdout, probe


def test_cpu_flow_writes_every_section(cpu_run):
    result, stdout, _ = cpu_run
    assert result["ok"] and result["failures"] == [] and result["quick"]
    assert set(result["checks"]) == {"no_host_sync", "compiled_step", "eval_matches_cpu", "kmeans"}
    assert all(c["ok"] for c in result["checks"].values())
    assert result["checks"]["no_host_sync"]["sync_debug"] is None  # CUDA's mode: not on the CPU
    assert result["checks"]["kmeans"]["features"] == "the trained exp1-m40000 model"
    assert set(result["bench"]) == {"bf16_compile", "fp32"}
    assert result["bench"]["bf16_compile"]["ok"] is None  # on the CPU: skipped, and said so
    assert result["bench_configs"]["bf16_compile"]["precision"] == "bf16"
    assert "  bf16" in stdout and "skipped: bf16 is emulated on the CPU" in stdout
    bench = result["bench"]["fp32"]
    assert bench["ok"] and bench["config"]["precision"] == "fp32" and not bench["config"]["compile"]
    assert bench["full"]["ms_per_iter"] > 0 and bench["ratio_full_over_model_only"] > 0
    # on the CPU without the memory probes (tests/test_bench.py runs them): said in the JSON and the table
    assert bench["memory"] is None and bench["targets"]["memory_M50000_within_10pct_of_M5000"] is None
    assert "5. peak memory (max RSS) of a short run: not measured in this pass" in stdout
    train = result["training"]
    assert train["ok"] and train["experiment"] == "exp1-m40000" and train["epochs"] == 1
    assert train["seconds_per_epoch"] > 0 and train["images_per_sec"] > 0 and 0 <= train["test_acc"] <= 1
    assert train["config"]["dataset"] == "synthetic" and train["config"]["epochs"] == 1
    assert set(result["seconds"]) == {"checks", "bench_bf16_compile", "bench_fp32", "training", "scaling", "total"}
    assert result["scaling"]["ok"] is None and "scaling: skipped: no GPUs visible: scaling is measured on 2 or more" in stdout
    assert result["within_budget"] and result["machine"]["device"] == "cpu"
    assert "ssl_lib gpu-check: cpu" in stdout and "result: all checks passed" in stdout
    assert "full / model-only" in stdout  # the bench's own tables are printed too


def test_cpu_flow_needs_no_notebook_or_test_tools(cpu_run):
    _, _, probe = cpu_run
    assert probe["attempts"] == [] and probe["loaded"] == []
    assert Path(probe["file"]).resolve() == ROOT / "ssl_lib" / "__init__.py"  # the source tree, as on PYTHONPATH


def test_table_names_failures_and_a_skipped_training(cpu_run):
    result = json.loads(json.dumps(cpu_run[0]))
    result["training"] = {"ok": None, "skipped": "no --data-root: ...", "config": None}
    result["checks"]["kmeans"] = {"ok": False, "error": "GpuCheckFailed: k-means: torch inertia ...", "seconds": 1.0}
    result["failures"], result["ok"] = ["k-means torch vs scikit-learn: ..."], False
    table = format_table(result).splitlines()
    assert table[0].startswith("ssl_lib gpu-check: cpu")
    assert any(line.startswith("training exp1-m40000: skipped: no --data-root") for line in table)
    assert any("k-means torch vs scikit-learn" in line and "FAILED" in line for line in table)
    assert table[-1].startswith("result: 1 FAILED")
    rate = {"steps_per_s": 10.0}
    result["scaling"] = {"ok": True, "config": "fixmatch-kmeans-250", "settings": gpu_check.SCALING, "global_batch": 512,
                         "processes": 4, "one": rate, "all": {"steps_per_s": 36.0}, "speedup": 3.6, "efficiency": 0.9}
    assert ("scaling fixmatch-kmeans-250 (bf16, batch 512): 10.00 steps/s on 1 GPU, 36.00 on 4: speedup 3.60, "
            "efficiency 90%") in format_table(result).splitlines()


def test_the_scaling_runs_are_the_protocol_step_on_every_gpu_that_splits_its_batches():
    from ssl_lib.experiments.protocol import protocol_dir

    cfg = load_config(protocol_dir() / f"{gpu_check.SCALING_CONFIG}.yaml", gpu_check.SCALING)
    assert (cfg.model, cfg.batch_size, cfg.unlabeled_batch_size, cfg.w_kmeans) == ("wrn28_2", 64, 448, 0.5)
    assert (cfg.steps, cfg.eval_every, cfg.compile, cfg.precision) == (300, 100, False, "bf16")  # DDP refuses compile
    assert [gpu_check.scaling_processes(cfg, g) for g in (2, 3, 4, 6, 8, 16)] == [2, 2, 4, 4, 8, 16]


def test_failed_section_is_recorded_and_the_rest_runs():
    failures = []
    row = gpu_check._section("boom", lambda: 1 / 0, failures)
    assert row["ok"] is False and row["error"].startswith("ZeroDivisionError") and failures == ["boom: division by zero"]
    with pytest.raises(ConfigError):  # bad input is not a failed check: it ends the command (exit 2)
        gpu_check._section("bad", lambda: (_ for _ in ()).throw(ConfigError("x")), [])


def test_bad_arguments_fail_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="--epochs"):
        run_gpu_check(tmp_path / "g.json", epochs=0)
    with pytest.raises(ConfigError, match="is a directory"):
        run_gpu_check(tmp_path)
    with pytest.raises(ConfigError, match="--dataset"):
        run_gpu_check(tmp_path / "g.json", data_root=str(tmp_path), dataset="synthetic", device="cpu")
    with pytest.raises(DataError, match="missing"):
        run_gpu_check(tmp_path / "g.json", data_root=str(tmp_path / "missing"), dataset="imagefolder", device="cpu")
    assert not (tmp_path / "g.json").exists()
