"""``python -m ssl_lib tune``: real studies on tiny synthetic data (a trial takes about a second),
real worker processes, a real PostgreSQL server when one is given (SSL_LIB_TEST_POSTGRES_URL;
required when CI=true), and every bad space file rejected before anything is written."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml
from PIL import Image

from ssl_lib.cli import main
from ssl_lib.config import load_config, make_config
from ssl_lib.data import load_data, split_indices, validation_indices
from ssl_lib.engine import rundir
from ssl_lib.engine.train import train

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_ENV = "SSL_LIB_TEST_POSTGRES_URL"

# A trial: 2 epochs of 3 steps of 32 + 16 images (16 x 16) on 240 synthetic training images (4 classes): about a second.
BASE = {"name": "tiny", "dataset": "synthetic", "synthetic_train": 240, "synthetic_test": 80, "synthetic_classes": 4,
        "num_unlabeled": 80, "val_size": 40, "epochs": 2, "max_iters_per_epoch": 3, "batch_size": 32, "image_size": 16,
        "crop_padding": 2, "unlabeled_batch_size": 16, "kmeans_n_init": 1, "eval_batch_size": 256, "log_every": 3}
SPACE = {"w_augment": {"low": 0.01, "high": 10.0, "log": True}, "lr": {"low": 1e-4, "high": 1e-2, "log": True},
         "kmeans_every": {"low": 1, "high": 2}}


def _write(path: Path, obj) -> Path:
    path.write_text(obj if isinstance(obj, str) else yaml.safe_dump(obj))
    return path


@pytest.fixture()
def files(tmp_path):
    return {"config": _write(tmp_path / "base.yaml", BASE), "space": _write(tmp_path / "space.yaml", SPACE)}


def _args(files, out, trials, *extra) -> list[str]:
    return ["tune", "--config", str(files["config"]), "--space", str(files["space"]), "--trials", str(trials),
            "--out", str(out), "--quiet", *extra]


def _trials(out: Path, study: str = "tiny-space", storage: str | None = None):
    import optuna

    from ssl_lib.tuning.storage import open_storage

    return optuna.load_study(study_name=study, storage=open_storage(storage, out)).get_trials()


def _states(trials) -> dict:
    out: dict = {}
    for t in trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


# ------------------------------------------------------------------------------ a small study

def test_small_study_writes_a_best_yaml_that_train_accepts_and_is_reproducible(files, tmp_path):
    assert main(_args(files, tmp_path / "a", 3, "--no-final")) == 0
    best = load_config(tmp_path / "a" / "best.yaml")
    assert best.val_size == 0 and best.synthetic_train == 240  # the base config, scored on the test split
    trials = _trials(tmp_path / "a")
    done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(done) == 3 and len(trials) == 3
    top = max((t for t in done if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert {k: getattr(best, k) for k in SPACE} == top.params
    for t in trials:  # each trial's run directory is under the study directory, linked from the trial
        run = Path(t.user_attrs["run_dir"])
        assert run.parent == (tmp_path / "a" / "trials").resolve() and (run / "config.yaml").is_file()
        assert "test_acc" not in rundir.read_metrics(run)["epoch"]  # finished or pruned
    summary = train(best, tmp_path / "best-run", quiet=True)
    assert summary["scored_on"] == "test" and summary["num_labeled"] + summary["num_unlabeled"] == 240

    assert main(_args(files, tmp_path / "b", 3, "--no-final")) == 0  # same seed: the same trials
    assert [t.params for t in _trials(tmp_path / "b")] == [t.params for t in trials]
    assert (tmp_path / "b" / "best.yaml").read_text() == (tmp_path / "a" / "best.yaml").read_text()
    # the same command again: the study is finished, nothing more runs
    assert main(_args(files, tmp_path / "a", 3, "--no-final")) == 0 and len(_trials(tmp_path / "a")) == 3


def test_final_training_tests_best_yaml_once(files, tmp_path):
    out = tmp_path / "s"
    assert main(_args(files, out, 2, "--pruner", "none")) == 0
    study = json.loads((out / "study.json").read_text())
    best = load_config(out / "best.yaml")
    final = out / f"final-{best.digest()}"  # the run of best.yaml, named by its digest
    assert study["trials_finished"] == 2 and Path(study["final"]["run_dir"]) == final
    assert load_config(final / "config.yaml").to_dict() == best.to_dict()  # it trained best.yaml, as written
    summary = json.loads((final / "summary.json").read_text())
    assert summary["scored_on"] == "test" and study["final"]["test_acc_final"] == summary["final_acc"]
    model = final / "model.pt"
    before = (model.stat().st_mtime_ns, model.read_bytes())

    assert main(_args(files, out, 2, "--pruner", "none")) == 0  # the same command again: not trained again
    assert (model.stat().st_mtime_ns, model.read_bytes()) == before
    assert [p.name for p in out.glob("final-*")] == [final.name]
    assert json.loads((out / "study.json").read_text())["final"] == study["final"]


# ------------------------------------------------------------------------- workers, storage

def _check_shared(trials, n: int) -> None:
    states = _states(trials)
    assert states.get("COMPLETE", 0) + states.get("PRUNED", 0) == n, states
    assert set(states) <= {"COMPLETE", "PRUNED"}, states  # no error, no leftover running trial
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    dirs = [t.user_attrs["run_dir"] for t in trials]
    assert len(set(dirs)) == len(dirs)
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == len(trials)  # no duplicate trial
    # each trial names the worker that ran it (how many trials each won is up to the machine's timing:
    # that two workers run trials side by side is tested without timing below)
    assert all(t.user_attrs["worker"] for t in trials) and len({t.user_attrs["worker"] for t in trials}) <= 2


def test_two_workers_share_the_embedded_study(files, tmp_path):
    assert main(_args(files, tmp_path / "s", 4, "--workers", "2", "--no-final", "--set", "epochs=1")) == 0
    _check_shared(_trials(tmp_path / "s"), 4)


def _spec(files, study_dir: Path, trials: int, workers: int = 1):
    from ssl_lib.tuning.space import load_space
    from ssl_lib.tuning.study import TuneSpec

    base = load_config(files["config"])
    return TuneSpec(base=base, space=load_space(files["space"], base), trials=trials, study_name="tiny-space",
                    study_dir=study_dir, workers=workers, quiet=True).check()


def test_two_workers_run_trials_side_by_side_and_split_the_study(files, tmp_path, monkeypatch):
    """Two workers of one study (threads here, so that the test can hold them): the first trial of
    each waits until the other worker is inside a trial too, which only happens if both got one."""
    from ssl_lib.tuning import study as study_module

    spec = _spec(files, tmp_path / "s", trials=4, workers=2)
    spec.study_dir.mkdir()
    study_module.open_study(spec, create=True)
    both_in_a_trial = threading.Barrier(2, timeout=60)
    first, real = {}, study_module.objective

    def objective(trial, spec, data):
        if threading.get_ident() not in first:
            first[threading.get_ident()] = trial.number
            both_in_a_trial.wait()  # BrokenBarrierError (the trial fails) if the other worker got none
        return real(trial, spec, data)

    monkeypatch.setattr(study_module, "objective", objective)
    data, errors = load_data(spec.base), []

    def worker():
        try:
            study_module.work(spec, data)
        except BaseException as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(first) == 2, errors
    trials = _trials(spec.study_dir)
    _check_shared(trials, 4)
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    a, b = (trials[n] for n in first.values())  # asked at the same history (no trial finished yet)
    assert a.number != b.number and a.params != b.params


def test_workers_asking_at_the_same_history_propose_different_trials_and_a_rerun_repeats_them(files, tmp_path):
    """Two workers (two handles on one study, as on two machines) ask at the same moment, in the
    random startup and in the TPE phase: different proposals. One worker on a fresh study with the
    same history: the same proposal for the same trial number."""
    from ssl_lib.tuning.study import open_study

    def proposals(study_dir: Path, history: int, workers: int) -> list[tuple[int, dict]]:
        spec = _spec(files, study_dir, trials=6)  # TPE after 2 random startup trials
        study_dir.mkdir()
        handles = [open_study(spec, create=True)] + [open_study(spec) for _ in range(workers - 1)]
        for i in range(history):  # the same finished trials in every study
            t = handles[0].ask()
            spec.space.suggest(t)
            handles[0].tell(t, 0.1 + 0.2 * (i % 3))
        asked = [h.ask() for h in handles]  # all ask before any suggests: the same history
        return [(t.number, spec.space.suggest(t)) for t in asked]

    for history in (0, 3):
        (na, a), (nb, b) = proposals(tmp_path / f"two-{history}", history, workers=2)
        assert (na, nb) == (history, history + 1)
        assert all(a[k] != b[k] for k in ("w_augment", "lr")), (a, b)
        assert proposals(tmp_path / f"again-{history}", history, workers=1) == [(na, a)]


@pytest.fixture()
def fresh_postgres_url():
    """A new, empty database on the test server, dropped afterwards: Optuna has no tables there yet."""
    import psycopg
    from sqlalchemy.engine import make_url

    server = make_url(_postgres_url())
    admin = server.set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"ssl_lib_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_two_commands_started_together_on_an_empty_database_share_the_study(files, tmp_path, fresh_postgres_url):
    """The several-machines recipe: the same command started at once on two machines (two study
    directories here), against a database where Optuna has not made its tables yet; the two split
    the study's trials (the PostgreSQL side of the embedded study's two-worker test above)."""
    url = fresh_postgres_url
    commands = [[sys.executable, "-m", "ssl_lib", *_args(files, tmp_path / m, 3, "--no-final", "--set", "epochs=1",
                                                         "--storage", url, "--study", "race")] for m in ("a", "b")]
    procs = [subprocess.Popen(c, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and [err for _, err in outs] == ["", ""], outs
    trials = _trials(tmp_path / "a", "race", url)
    # both machines may start the last trial at once: N or N + 1 trials (docs/tuning.md), never a failed one
    _check_shared(trials, len(trials))
    assert len(trials) in (3, 4) and set(_states(trials)) <= {"COMPLETE", "PRUNED"}
    for m in ("a", "b"):  # each finished the one study (its best as it stood when that command ended)
        summary = json.loads((tmp_path / m / "study.json").read_text())
        assert summary["study"] == "race" and summary["best_trial"] in {t.number for t in trials}
        assert not (tmp_path / m / "study.journal").exists()  # the database holds the study, not a file


def test_commands_setting_up_one_study_at_once_wait_for_each_other(files, tmp_path, fresh_postgres_url, monkeypatch):
    """Four set-ups released together on an empty database: one makes the tables and the study, records
    it and enqueues its first trial; the others wait for it and find it (no duplicate key, no second enqueue)."""
    from dataclasses import replace

    import optuna

    from ssl_lib.tuning.study import open_study

    calls, record, enqueue = [], optuna.Study.set_user_attr, optuna.Study.enqueue_trial

    def slow_record(self, key, value):  # a slow database: the others would find the study unrecorded
        calls.append(key)
        time.sleep(0.3)
        record(self, key, value)

    monkeypatch.setattr(optuna.Study, "set_user_attr", slow_record)
    monkeypatch.setattr(optuna.Study, "enqueue_trial", lambda self, *a, **k: (calls.append("enqueue"),
                                                                              enqueue(self, *a, **k))[1])
    _write(files["space"], {**SPACE, "enqueue": [{"w_augment": 0.25, "lr": 1e-3, "kmeans_every": 1}]})
    spec = replace(_spec(files, tmp_path / "s", trials=2), storage=fresh_postgres_url, study_name="together")
    go, errors = threading.Barrier(4, timeout=60), []

    def set_up(i: int) -> None:
        go.wait()
        try:
            open_study(replace(spec, study_dir=tmp_path / f"machine-{i}"), create=True)
        except BaseException as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=set_up, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    trials = _trials(tmp_path, "together", fresh_postgres_url)
    assert [t.state.name for t in trials] == ["WAITING"] and calls == ["ssl_lib", "base_config", "enqueue"]


def _postgres_url() -> str:
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {POSTGRES_ENV} is not set: .ci/run starts a PostgreSQL server for this test")
        pytest.skip(f"no PostgreSQL server given ({POSTGRES_ENV}=postgresql://user:password@host/db)")
    return url


def _freeze_mid_trial(proc: subprocess.Popen, out: Path) -> int:
    """Stop the worker (SIGSTOP) in a known state: a trial after the first is RUNNING and has
    checkpointed an epoch. Checked while the worker is stopped, so the state cannot move on between
    the look and the kill; if it had moved on, the worker goes on and the next trial is taken."""
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "no trial after the first ever checkpointed an epoch"
        started = sorted(int(p.parent.name.split("-")[1]) for p in (out / "trials").glob("trial-*/checkpoint.pt"))
        if started and started[-1] >= 1:
            proc.send_signal(signal.SIGSTOP)
            trials = _trials(out)
            if trials[started[-1]].state.name == "RUNNING":
                return started[-1]
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.05)


def test_a_killed_worker_loses_its_trial_and_the_rerun_finishes_the_study(files, tmp_path):
    out = tmp_path / "s"
    args = _args(files, out, 3, "--no-final", "--pruner", "none", "--set", "epochs=6")
    proc = subprocess.Popen([sys.executable, "-m", "ssl_lib", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    number = _freeze_mid_trial(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _states(_trials(out)) == {"COMPLETE": number, "RUNNING": 1}  # what kill -9 leaves behind
    run = out / "trials" / f"trial-{number:04d}"
    (run / ".checkpoint.pt.k1ll3d_0.tmp").write_bytes(b"half a checkpoint")  # killed inside atomic_write
    (run / "notes.tmp").write_text("not the writer's")

    assert main(args) == 0  # the same command again
    trials = _trials(out)
    assert _states(trials) == {"COMPLETE": 3, "FAIL": 1}
    dead = trials[number]
    assert dead.state.name == "FAIL" and dead.user_attrs["failed_because"] == "its worker stopped"
    assert Path(dead.user_attrs["run_dir"]) == run.resolve()
    # its run directory is kept, less what the killed writer left half-written
    assert sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp")) == ["notes.tmp"]
    assert (run / "checkpoint.pt").is_file()


def test_a_clearly_worse_configuration_is_pruned(files, tmp_path):
    good = {"w_augment": 0.1, "lr": 1e-3, "kmeans_every": 1}  # about 0.6 validation accuracy after one epoch
    bad = {**good, "lr": 1e-7}  # barely moves from the initialisation: chance (0.25)
    _write(files["space"], {**SPACE, "lr": {"low": 1e-7, "high": 1e-2, "log": True},
                            "enqueue": [good, {**good, "lr": 1.1e-3}, bad]})
    assert main(_args(files, tmp_path / "s", 3, "--no-final", "--set", "epochs=3")) == 0
    trials = _trials(tmp_path / "s")
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"] and trials[2].params == bad
    for t in trials:  # what the pruner judged, epoch by epoch, is each trial's validation accuracy
        val_acc = rundir.read_metrics(t.user_attrs["run_dir"])["epoch"]["val_acc"]  # a pruned run has no metrics.json
        assert t.intermediate_values == pytest.approx(dict(enumerate(val_acc, 1)))
    pruned = trials[2].intermediate_values
    assert list(pruned) == [1] and pruned[1] == pytest.approx(0.25, abs=0.05)  # stopped at epoch 1 of 3, at chance
    # clearly worse: far below the median of the complete trials at that epoch (the median pruner's rule)
    assert pruned[1] < statistics.median(t.intermediate_values[1] for t in trials[:2]) - 0.2
    assert trials[2].user_attrs["pruned_because"] == f"at epoch 1, val acc {pruned[1]:.4f}"


def test_validation_never_overlaps_and_the_test_split_is_not_read(tmp_path):
    root = tmp_path / "img"  # an image folder whose test split is unreadable: tuning must not touch it
    for cls, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
        for split in ("train", "test"):
            (root / split / cls).mkdir(parents=True)
        for i in range(30):
            Image.new("RGB", (8, 8), tuple(c + i for c in colour)).save(root / "train" / cls / f"{i}.png")
        (root / "test" / cls / "broken.png").write_bytes(b"not an image")
    base = {"name": "img", "dataset": "imagefolder", "data_root": str(root), "cache_dir": str(tmp_path / "cache"),
            "image_size": 8, "crop_padding": 1, "num_unlabeled": 20, "val_size": 10, "epochs": 1,
            "max_iters_per_epoch": 2, "batch_size": 8, "unlabeled_batch_size": 8, "kmeans_n_init": 1}
    files = {"config": _write(tmp_path / "base.yaml", base),
             "space": _write(tmp_path / "space.yaml", {"tau": {"low": 0.5, "high": 0.99}})}
    assert main(_args(files, tmp_path / "s", 2, "--no-final")) == 0

    cfg = load_config(files["config"])
    data = load_data(cfg)
    assert len(data.test) == 0  # the tuning base never reads the test split
    val, _ = validation_indices(cfg, data.train.labels)
    labeled, unlabeled = split_indices(cfg, data.train.labels)
    assert len(val) == 10 and set(val).isdisjoint(labeled) and set(val).isdisjoint(unlabeled)
    assert len(labeled) + len(unlabeled) == 50 and len(unlabeled) == 20
    for t in _trials(tmp_path / "s", "img-space"):
        summary = json.loads((Path(t.user_attrs["run_dir"]) / "summary.json").read_text())
        assert summary["scored_on"] == "val" and sum(map(sum, summary["confusion"])) == 10


# ------------------------------------------------------------------------------ bad input

BAD_SPACES = [  # (space file text, message fragment)
    ("w_kmean: {low: 0.1, high: 1}\n", "unknown config key 'w_kmean'; did you mean 'w_kmeans'?"),
    ("tau: {low: 0.9, high: 0.9}\n", "empty or inverted range"),
    ("tau: {low: 0.9, high: 0.5}\n", "empty or inverted range"),
    ("w_kmeans: {low: 0, high: 100, log: true}\n", "a log range needs low > 0"),
    ("lr: {low: -1.0e-3, high: 1.0e-2, log: true}\n", "a log range needs low > 0"),
    ("dataset: {choices: [synthetic, cifar10]}\n", "field 'dataset' cannot be tuned"),
    ("data_root: {choices: [a, b]}\n", "field 'data_root' cannot be tuned: it is a path"),
    ("cache_dir: {choices: [a, b]}\n", "field 'cache_dir' cannot be tuned"),
    ("device: {choices: [cpu, cuda]}\n", "field 'device' cannot be tuned: it is the hardware"),
    ("epochs: {low: 1, high: 5}\n", "run length of the profile"),
    ("max_iters_per_epoch: {low: 1, high: 5}\n", "run length of the profile"),
    ("steps: {low: 100, high: 500}\n", "field 'steps' cannot be tuned: it is the run length of the profile"),
    ("val_size: {low: 10, high: 50}\n", "field 'val_size' cannot be tuned"),
    ("log_every: {low: 1, high: 50}\n", "field 'log_every' cannot be tuned: it is logging"),
    ("tau: {low: 0.5, high: 1.5}\n", "'tau' must be in [0, 1]"),
    ("lr: {low: 0, high: 0.1}\n", "'lr' must be > 0"),
    ("w_augment: {low: -1, high: 1}\n", "'w_augment' must be >= 0"),
    ("kmeans_every: {low: 0, high: 3}\n", "'kmeans_every' must be >= 1"),
    ("kmeans_every: {low: 1.5, high: 3}\n", "is an int: low must be a whole number"),
    ("optimizer: {choices: [adam, rmsprop]}\n", "'optimizer' must be one of"),
    ("labeled_view: {choices: [weak, blurry]}\n", "'labeled_view' must be one of"),
    ("optimizer: {low: 1, high: 2}\n", "give {choices: [...]}, not a range"),
    ("tau: {low: 0.5}\n", "range needs 'high'"),
    ("tau: {low: 0.5, high: 0.9, steps: 0.1}\n", "unknown key(s) steps"),
    ("tau: {low: 0.5, high: 0.9, step: 0.5}\n", "step 0.5 is larger than the range"),
    ("tau: {low: 0.5, high: 0.9, log: true, step: 0.1}\n", "log and step cannot be combined"),
    ("tau: {low: 0.5, high: .nan}\n", "high must be a finite number"),
    ("tau: [0.5, 0.9]\n", "expected {low, high} or {choices: [...]}"),
    ("tau: {choices: []}\n", "choices must be a non-empty list"),
    ("tau: {low: 0.5, high: 0.9}\nenqueue: [{tau: 2.0}]\n", "enqueue entry 1: config field 'tau' must be in [0, 1]"),
    ("tau: {low: 0.5, high: 0.9}\nenqueue: [{lr: 0.1}]\n", "enqueue entry 1 must set exactly the tuned fields"),
    ("tau: {low: 0.5, high: 0.9\nlr: 1\n", "YAML syntax error at line 2, column 3"),
    ("", "must map config fields to distributions"),
    ("- tau\n", "must map config fields to distributions"),
    ("enqueue: []\n", "names no field to tune"),
]


@pytest.mark.parametrize("text,fragment", BAD_SPACES, ids=[f"space{i}" for i in range(len(BAD_SPACES))])
def test_bad_space_file_exits_2_with_one_line_and_writes_nothing(text, fragment, files, tmp_path, capsys):
    _write(files["space"], text)
    assert main(_args(files, tmp_path / "s", 2)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: space file ") and fragment in err and err.count("\n") == 1, err
    assert not (tmp_path / "s").exists()


BAD_COMMANDS = [  # (changes to the arguments, base config changes, message fragment)
    (["--trials", "0"], {}, "--trials must be >= 1"),
    (["--workers", "0"], {}, "--workers must be >= 1"),
    (["--pruner", "asha"], {}, "--pruner must be one of median, hyperband, none"),
    (["--storage", "localhost:5432"], {}, "is not a database URL"),
    (["--storage", "postgresql://me:secret@127.0.0.1:9/nodb"], {}, "postgresql://me:***@127.0.0.1:9/nodb: cannot open"),
    (["--study", "a/b"], {}, "--study 'a/b': use letters"),
    (["--set", "w_kmeans=-1"], {}, "'w_kmeans' must be >= 0"),
    (["--profile", "nope"], {}, "unknown profile 'nope'"),
    ([], {"val_size": 0}, "needs val_size > 0"),
    ([], {"model": "resnet"}, "'model' must be one of"),
]


@pytest.mark.parametrize("extra,base,fragment", BAD_COMMANDS, ids=[f"cmd{i}" for i in range(len(BAD_COMMANDS))])
def test_bad_command_exits_2_with_one_line_and_writes_nothing(extra, base, fragment, files, tmp_path, capsys):
    _write(files["config"], {**BASE, **base})
    args = _args(files, tmp_path / "s", 2)
    for i in range(0, len(extra), 2):  # replace an option already given, else add it
        if extra[i] in args:
            args[args.index(extra[i]) + 1] = extra[i + 1]
        else:
            args += extra[i:i + 2]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err and err.count("\n") == 1 and "secret" not in err, err
    assert not (tmp_path / "s").exists()


def test_the_trial_count_comes_from_trials_else_the_profile(files, tmp_path, capsys):
    from ssl_lib.tuning.command import trials_wanted

    assert [trials_wanted(None, p) for p in ("smoke", "quick", "full")] == [3, 20, 40]
    assert trials_wanted(5, "quick") == 5
    args = _args(files, tmp_path / "s", 1)
    del args[args.index("--trials"):args.index("--trials") + 2]
    assert main(args) == 2  # neither --trials nor a profile
    err = capsys.readouterr().err
    assert "--trials: give the number of finished trials wanted" in err and err.count("\n") == 1, err
    assert not (tmp_path / "s").exists()


def test_a_study_rerun_with_another_space_is_refused(files, tmp_path, capsys):
    assert main(_args(files, tmp_path / "s", 1, "--no-final", "--pruner", "none")) == 0
    _write(files["space"], {"tau": {"low": 0.5, "high": 0.9}})
    assert main(_args(files, tmp_path / "s", 2, "--no-final")) == 2
    assert "was made with another search space" in capsys.readouterr().err
    assert len(_trials(tmp_path / "s")) == 1


def test_random_search_draws_each_parameter_by_trial_and_name_so_pools_pair_up():
    """Two random pools over spaces that share parameters draw the same values of them at the same
    trial number whatever else each space holds, and a rerun draws the same trials."""
    import optuna

    from ssl_lib.config import make_config
    from ssl_lib.tuning.study import TuneSpec, make_sampler

    def draws(space: dict, n: int = 4) -> list[dict]:
        spec = TuneSpec(base=make_config(BASE), space=None, trials=n, study_name="s", study_dir=Path("."),
                        sampler="random")  # the sampler reads the base seed alone
        study = optuna.create_study(sampler=make_sampler(spec), direction="maximize")
        out = []
        for _ in range(n):
            t = study.ask()
            out.append({k: (t.suggest_float(k, 0.01, 10.0, log=True) if k != "kmeans_every" else t.suggest_int(k, 1, 5))
                        for k in space})
            study.tell(t, 0.0)
        return out

    with_k = draws({"w_kmeans": None, "w_augment": None, "kmeans_every": None, "lr": None})
    without = draws({"w_augment": None, "lr": None})
    assert [(d["w_augment"], d["lr"]) for d in with_k] == [(d["w_augment"], d["lr"]) for d in without]
    assert len({d["lr"] for d in with_k}) == 4 and with_k == draws({"w_kmeans": None, "w_augment": None,
                                                                        "kmeans_every": None, "lr": None})


def test_a_pool_trains_trial_i_on_seed_i_and_refuses_to_be_continued_by_tpe(files, tmp_path, capsys):
    assert main(_args(files, tmp_path / "p", 2, "--no-final", "--pruner", "none", "--sampler", "random",
                      "--seed-per-trial")) == 0
    for t in _trials(tmp_path / "p"):
        cfg = load_config(Path(t.user_attrs["run_dir"]) / "config.yaml")
        assert cfg.seed == t.number == t.user_attrs["seed"] and cfg.data_seed == 0
    assert main(_args(files, tmp_path / "p", 3, "--no-final")) == 2
    assert "was made with another sampler or seeding (--sampler, --seed-per-trial)" in capsys.readouterr().err
    assert main(_args(files, tmp_path / "q", 1, "--sampler", "grid")) == 2
    assert "--sampler must be one of tpe, random, got 'grid'" in capsys.readouterr().err


def test_a_pool_trained_through_the_executor_gives_the_trials_tune_gives(files, tmp_path):
    """make reports trains its pools' trials as runs of the executor (tuning/report.py: train_pool),
    the study kept by the driver: the same trials, values and epochs as the same pool run by
    ``tune``; a trial a stopped driver left running is trained with the values it was given; a run
    that diverges stays in the pool, pruned."""
    from dataclasses import replace

    from ssl_lib.experiments.executor import DIVERGED, settings_from_env
    from ssl_lib.tuning.report import train_pool
    from ssl_lib.tuning.study import open_study

    assert main(_args(files, tmp_path / "p", 2, "--no-final", "--pruner", "none", "--sampler", "random",
                      "--seed-per-trial")) == 0
    spec = replace(_spec(files, tmp_path / "e", 2), sampler="random", pruner="none", seed_per_trial=True, final=False)
    study = open_study(spec, create=True)
    spec.space.suggest(study.ask())  # a driver that asked for trial 0, then stopped: left RUNNING
    train_pool(spec, settings_from_env({}))
    by_tune, by_jobs = _trials(tmp_path / "p"), _trials(tmp_path / "e")
    assert [t.state.name for t in by_jobs] == ["COMPLETE", "COMPLETE"]
    for a, b in zip(by_tune, by_jobs):
        assert (a.number, a.params, a.value, a.intermediate_values) == (b.number, b.params, b.value, b.intermediate_values)
        assert a.user_attrs["seed"] == b.user_attrs["seed"] == a.number
        assert Path(b.user_attrs["run_dir"]) == (tmp_path / "e" / "trials" / f"trial-{b.number:04d}").resolve()
    train_pool(spec, settings_from_env({}))  # finished: nothing asked, nothing trained
    assert len(_trials(tmp_path / "e")) == 2

    diverging = replace(spec, base=make_config({**BASE, "w_labeled": 1e39}), study_dir=tmp_path / "d")
    train_pool(diverging, settings_from_env({}))
    trials = _trials(tmp_path / "d")
    assert [t.state.name for t in trials] == ["PRUNED", "PRUNED"]
    assert all(t.user_attrs["pruned_because"].startswith("diverged: loss 'loss_total' became inf at step 0") for t in trials)
    assert all((Path(t.user_attrs["run_dir"]) / DIVERGED).is_file() for t in trials)


def test_the_report_spaces_are_valid_at_every_profile():
    from ssl_lib.tuning.command import resolve_base
    from ssl_lib.tuning.space import load_space

    spaces = [p for p in sorted((ROOT / "configs" / "tuning").glob("*.yaml")) if p.name != "base.yaml"]
    assert [p.stem for p in spaces] == ["kmeans", "no-kmeans"]
    for profile in ("smoke", "quick", "full"):
        base = resolve_base(ROOT / "configs" / "tuning" / "base.yaml", [], profile)
        assert base.val_size > 0 and base.num_unlabeled > 0
        for path in spaces:
            load_space(path, base)


def test_a_profiles_tune_epochs_set_every_tuning_run_and_leave_the_grid_alone(monkeypatch):
    from ssl_lib.experiments.grid import DATA_ENV, resolve
    from ssl_lib.tuning.command import resolve_base
    from ssl_lib.tuning.report import pool_spec, untuned_configs

    for var in DATA_ENV.values():
        monkeypatch.delenv(var, raising=False)
    # quick: tune_epochs 2 for the pools, make tune's base and the untuned pair; the grid keeps its 5
    assert pool_spec("quick", "kmeans").base.epochs == 2
    assert resolve_base(ROOT / "configs" / "tuning" / "base.yaml", [], "quick").epochs == 2
    pair = untuned_configs("quick")
    assert {c.epochs for runs in pair.values() for c in runs} == {2}
    assert [c.seed for c in pair["untuned"]] == [0, 1, 2, 3, 4]
    assert resolve("exp2-wk0.25", "quick").epochs == 5
    # their only difference from the grid's run is the epochs (and w_kmeans for the other side)
    grid_run = resolve("exp2-wk0.25", "quick").to_dict()
    assert {k for k, v in pair["untuned"][0].to_dict().items() if grid_run[k] != v} == {"epochs"}
    # full sets none: the tuning base's 35 epochs, scaled by 1.0
    assert pool_spec("full", "kmeans").base.epochs == 35
    assert {c.epochs for runs in untuned_configs("full").values() for c in runs} == {35}


def test_the_06_tuning_page_on_the_smoke_profile(smoke_pages):
    """make reports' tuning part: two random-search pools paired by trial (seed i, the shared values
    drawn alike, the data fixed), every trial scored once on the test set, the untuned pair per seed,
    and the page's verdicts. The page is the smoke report's (conftest.py), built once per test run
    under the test run's runs root, where nbval's 06-tuning finds its pools too."""
    from ssl_lib.tuning import report as tr

    runs_dir = None  # the test run's runs root ($SSL_LIB_RUNS/smoke, where smoke_pages trained)
    record = json.loads((smoke_pages / "records" / "06-tuning.json").read_text())
    assert [s["pool"] for s in record["pools"]] == [tr.LABELS["kmeans"], tr.LABELS["no-kmeans"]]
    assert all(s["trials"] == 3 and s["complete"] == 3 for s in record["pools"])  # smoke.yaml: tune_trials: 3
    with_k, without = record["trials_kmeans"], record["trials_no_kmeans"]
    assert [r["seed"] for r in with_k] == [r["seed"] for r in without] == [0, 1, 2]
    for a, b in zip(with_k, without):  # common random numbers: the shared parameters drawn alike
        assert (a["w_augment"], a["tau"], a["lr"]) == (b["w_augment"], b["tau"], b["lr"]) and "w_kmeans" not in b
        assert 0 <= a["test acc"] <= 1 and 0 <= b["test acc"] <= 1
        trial = tr.study_dir("smoke", "kmeans", runs_dir) / "trials" / f"trial-{a['trial']:04d}"
        cfg = load_config(trial / "config.yaml")
        assert cfg.seed == a["seed"] and cfg.data_seed == 0 and cfg.val_size > 0  # trained without the test set
        assert json.loads((trial / tr.TEST_FILE).read_text())["test_acc"] == a["test acc"]
    answers = record["answers"]
    assert answers["k"] == 2 and answers["kmeans_tuned"]["n"] == 3  # smoke.yaml: tune_headline_k: 2
    curve_a = answers["kmeans_tuned"]["expected_a"]
    from ssl_lib.experiments.stats import expected_best_of_k

    assert curve_a[1] == pytest.approx(expected_best_of_k([r["val acc (final)"] for r in with_k],
                                                           [r["test acc"] for r in with_k], 2))
    best_val = max(r["val acc (final)"] for r in with_k)  # k = N: the pool's pick (trials tied on it share)
    picked = [r["test acc"] for r in with_k if r["val acc (final)"] == best_val]
    assert curve_a[-1] == pytest.approx(sum(picked) / len(picked))
    assert "expected test accuracy of the validation-best of 2" in answers["kmeans_verdict"]
    assert "after Holm's correction over 2 verdicts" in answers["kmeans_untuned_verdict"]
    assert [r["experiment"] for r in record["accuracy"]] == [tr.LABELS["untuned"], tr.LABELS["untuned-no-kmeans"]]
    assert all(r["seeds"] == len(tr.SEEDS["smoke"]) for r in record["accuracy"])
    assert record["accuracy"][0]["w_kmeans"] == 0.25 and record["accuracy"][1]["w_kmeans"] == 0
    assert "<img" in (smoke_pages / "06-tuning.html").read_text()
