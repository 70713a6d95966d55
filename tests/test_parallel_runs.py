"""Models trained in parallel: worker processes (``--jobs``), the same results, lost workers, Ctrl-C."""
import collections
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastconv.app import runs
from fastconv.app.parallel import parallel_training
from fastconv.app.training import TrainConfig
from test_train_app import (KEYS, blas_threads_as_started, main, needs_sigint, offline, one_blas_thread,  # noqa: F401
                            quiet, read_json, synthetic_dir, train)

# Three models of five short epochs: a worker killed after a model's first epoch has four to go, longer
# than the run takes to notice (it may be writing a finished model's figures meanwhile).
SEED, MODELS = 4, 3
SETTINGS = {"epochs": 5, "batch_size": 20, "dtype": "float32", "limit_train": 400, "limit_test": 50,
            "eval_train_size": 20}


def options(**settings):
    return [word for name, value in dict(SETTINGS, **settings).items()
            for word in (f"--{name.replace('_', '-')}", str(value))]


def ensemble_config():
    return TrainConfig.from_recipe("book", seed=SEED, ensemble=MODELS, **SETTINGS)


@pytest.fixture(scope="module")
def alone(synthetic_dir, tmp_path_factory):
    """Each model trained alone in this process on one kernel thread: {seed: its folder}."""
    folders = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTCONV_NUM_THREADS", "1")
        for seed in range(SEED, SEED + MODELS):
            folders[seed] = tmp_path_factory.mktemp(f"alone-{seed}")
            assert train("--data-dir", synthetic_dir, "--out", folders[seed], "--overwrite", "--seed", seed,
                         *options()) == 0
    return folders


def assert_same_model(folder, alone_folder):
    with np.load(folder / "params.npz") as a, np.load(alone_folder / "params.npz") as b:
        for key in KEYS:
            assert np.array_equal(a[key], b[key]), (folder, key)
    trained, expected = read_json(folder / "history.json"), read_json(alone_folder / "history.json")
    assert trained["test_acc"] == expected["test_acc"]
    assert trained["step_loss"] == expected["step_loss"]


def assert_members_are_the_models_trained_alone(out, alone):
    for k in range(MODELS):
        assert_same_model(out / f"member-{k + 1}", alone[SEED + k])
        assert not (out / f"member-{k + 1}" / "checkpoint.npz").exists()
        assert [p.name for p in (out / f"member-{k + 1}").iterdir() if p.name.startswith(".")] == []


class Events:
    """Progress events of a run, by model; ``when(test, action)`` runs ``action(event)`` once, at the first match."""

    def __init__(self):
        self.by_key = collections.defaultdict(list)
        self.finished = []
        self.triggers = []

    def when(self, test, action):
        self.triggers.append([test, action, False])

    def starts(self, key):
        return [e for e in self.by_key[key] if e["kind"] == "start"]

    def __call__(self, event):
        self.by_key[event["key"]].append(event)
        if event["kind"] == "done":
            self.finished.append(event["key"])
        for trigger in self.triggers:
            if not trigger[2] and trigger[0](event):
                trigger[2] = True
                trigger[1](event)


def first_epoch_ends(events, only_after_a_finished_model=False, models_started=1):
    """A model's first epoch ends (once ``models_started`` models have reported their start)."""
    def test(event):
        return (event["kind"] == "log" and event["text"].startswith("epoch   1/")
                and (events.finished or not only_after_a_finished_model)
                and sum(bool(events.starts(k)) for k in list(events.by_key)) >= models_started)

    return test


# -- the same results --------------------------------------------------------------------------------


@pytest.mark.slow
def test_members_on_two_jobs_are_the_models_trained_alone(synthetic_dir, tmp_path, alone, capsys):
    out = tmp_path / "ensemble"
    assert train("--data-dir", synthetic_dir, "--out", out, "--seed", SEED, "--ensemble", MODELS, "--jobs", 2,
                 *options()) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "2 models at a time in worker processes, 1 kernel thread each (FASTCONV_NUM_THREADS=1" in printed[0]
    assert sum("1 kernel thread)" in line and "starts (process" in line for line in printed) == MODELS
    assert_members_are_the_models_trained_alone(out, alone)

    summary = read_json(out / "history.json")
    accuracies = [read_json(alone[SEED + k] / "history.json")["test_acc"] for k in range(MODELS)]
    assert [m["test_acc"] for m in summary["members"]] == accuracies


def test_default_jobs_fill_the_cores_and_jobs_1_trains_here(monkeypatch):
    from fastconv.app import executors

    monkeypatch.setattr(executors, "cpu_count", lambda: 4)
    assert executors.default_jobs(10) == 4 and executors.default_jobs(3) == 3 and executors.default_jobs(1) == 1
    assert parallel_training(5, jobs=1) is None  # one after another, in this process
    assert parallel_training(1) is None
    with pytest.raises(ValueError, match="--jobs"):
        parallel_training(5, jobs=0)


# -- faults ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_killed_worker_process_loses_no_finished_model(synthetic_dir, tmp_path, alone):
    events = Events()
    killed = []

    def kill(event):
        pid = events.starts(event["key"])[-1]["pid"]
        killed.append((event["key"], list(events.finished)))
        os.kill(pid, signal.SIGKILL)

    # the third model starts when one of the first two has finished; kill its worker after its first epoch
    events.when(first_epoch_ends(events, only_after_a_finished_model=True), kill)
    out = tmp_path / "ensemble"
    with parallel_training(MODELS, jobs=2, progress=False, on_event=events) as parallel:
        runs.run(ensemble_config(), out, data_dir=synthetic_dir, log=quiet, progress=False, parallel=parallel)

    (victim, finished_before), = killed
    assert finished_before and victim not in finished_before
    assert sorted(events.finished) == list(range(MODELS))  # each model handed over once
    for key in finished_before:  # trained once, never again
        assert len(events.starts(key)) == 1
    again = events.starts(victim)
    assert len(again) == 2 and again[1]["resumed"] and again[1]["epoch"] >= 1  # from its checkpoint
    assert any(e["kind"] == "lost" for e in events.by_key[victim])
    assert_members_are_the_models_trained_alone(out, alone)


@pytest.mark.slow
def test_ctrl_c_stops_every_member_with_a_checkpoint_that_resume_continues(synthetic_dir, tmp_path, alone):
    events = Events()

    def ctrl_c(event):
        raise KeyboardInterrupt

    # a worker's start reaches this process after its first epoch may have ended in the other worker
    events.when(first_epoch_ends(events, models_started=2), ctrl_c)
    out = tmp_path / "ensemble"
    with parallel_training(MODELS, jobs=2, progress=False, on_event=events) as parallel:
        with pytest.raises(KeyboardInterrupt):
            runs.run(ensemble_config(), out, data_dir=synthetic_dir, log=quiet, progress=False, parallel=parallel)
    started = [k for k in range(MODELS) if events.starts(k)]
    assert len(started) >= 2
    for k in started:  # a finished model keeps its parameters, the others a checkpoint
        folder = out / f"member-{k + 1}"
        assert (folder / "params.npz").is_file() != (folder / "checkpoint.npz").is_file(), k
    assert runs.checkpoints(out)

    events = Events()
    with parallel_training(MODELS, jobs=2, progress=False, on_event=events) as parallel:
        runs.run(None, out, resume=True, data_dir=synthetic_dir, log=quiet, progress=False, parallel=parallel)
    assert any(start["resumed"] for k in range(MODELS) for start in events.starts(k))
    assert_members_are_the_models_trained_alone(out, alone)


@pytest.mark.slow
@needs_sigint
def test_sigint_stops_the_workers_with_checkpoints_and_exits_130(synthetic_dir, tmp_path):
    out = tmp_path / "ensemble"
    command = [sys.executable, "-u", "-m", "fastconv", "train", "--quiet", "--data-dir", str(synthetic_dir),
               "--out", str(out), "--ensemble", "2", "--jobs", "2", *options(epochs=1000)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONWARNINGS="ignore"))
    try:
        for line in process.stdout:
            if "epoch   1/1000" in line:
                break
        process.send_signal(signal.SIGINT)  # the run only, as a terminal's Ctrl-C reaches it first
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "interrupted: a checkpoint is saved" in err and "--jobs 2" in err.splitlines()[-1]
    for k in (1, 2):
        checkpoint = out / f"member-{k}" / "checkpoint.npz"
        assert checkpoint.is_file(), k


def test_a_missing_dask_extra_is_named(synthetic_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed raises ImportError
    assert train("--data-dir", synthetic_dir, "--out", tmp_path / "run", "--dask", "tcp://127.0.0.1:1",
                 *options()) == 1
    assert 'pip install "fastconv[dask]"' in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# -- sweeps ------------------------------------------------------------------------------------------


def test_grid_combinations_and_their_names():
    from fastconv.app.sweep import expand_grid, setting_name

    grid = {"lr": [0.001, 0.0005], "lr_schedule": ["none", "cosine"], "seed": [0, 1, 2]}
    combinations = expand_grid(grid)
    assert len(combinations) == 12 and combinations[0] == {"lr": 0.001, "lr_schedule": "none", "seed": 0}
    assert combinations[-1] == {"lr": 0.0005, "lr_schedule": "cosine", "seed": 2}
    assert len({setting_name(c) for c in combinations}) == 12
    assert setting_name(combinations[1]) == "lr=0.001,lr_schedule=none,seed=1"
    with pytest.raises(ValueError, match="distinct"):
        expand_grid({"seed": [1, 1]})
    with pytest.raises(ValueError, match="cannot vary"):
        expand_grid({"ensemble": [1, 2]})


def test_a_sweep_refuses_bad_values_and_a_used_folder(synthetic_dir, tmp_path, capsys):
    sweep = ["sweep", "--quiet", "--data-dir", str(synthetic_dir), "--jobs", "2"]
    assert main([*sweep, "--out", str(tmp_path / "a"), "--lr", "0.001", "-1"]) == 2
    assert "lr" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main([*sweep, "--out", str(tmp_path / "b"), "--seed", "1", "2", "--backend", "no-such-backend"]) == 2
    assert "no-such-backend" in capsys.readouterr().err and not (tmp_path / "b").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    assert main([*sweep, "--out", str(tmp_path / "used"), "--seed", "1", "2"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["sweep", "--resume", "--out", str(tmp_path / "nothing")]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_a_sweep_trains_every_combination_and_ranks_them(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    small = options(epochs=1, batch_size=10, limit_train=20, limit_test=10, eval_train_size=10)
    assert main(["sweep", "--quiet", "--data-dir", str(synthetic_dir), "--out", str(out), "--jobs", "1",
                 "--lr", "0.001", "0.0005", "--validation", "5", *small]) == 0
    printed = capsys.readouterr().out
    assert read_json(out / "sweep.json")["grid"]["lr"] == [0.001, 0.0005]
    assert read_json(out / "sweep.json")["shared"]["validation"] == 5
    accuracy, validation = {}, {}
    for name, lr in (("lr=0.001", 0.001), ("lr=0.0005", 0.0005)):
        for file in ("config.json", "data.json", "params.npz", "history.json", "curves.png"):
            assert (out / name / file).is_file(), (name, file)
        assert read_json(out / name / "config.json")["lr"] == lr
        history = read_json(out / name / "history.json")
        accuracy[name], validation[name] = history["test_acc"], history["val_acc"]
    summary = read_json(out / "summary.json")
    assert {row["name"]: row["val_acc"] for row in summary["runs"]} == validation
    assert [row["name"] for row in summary["runs"]] == sorted(accuracy, key=lambda name: -accuracy[name])
    assert [row["test_acc"] for row in summary["runs"]] == sorted(accuracy.values(), reverse=True)
    assert "over_seeds" not in summary  # one seed
    assert printed.splitlines()[0].startswith("sweep of 2 runs (2 lr) on 15 images; 1 model at a time")
    assert "rank  test acc" in printed and f"summary: {out / 'summary.json'}" in printed


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_and_each_run_is_the_single_run_it_stands_for(synthetic_dir, tmp_path, capsys,
                                                                                  blas_threads_as_started):
    from fastconv.app.sweep import run_sweep

    out = tmp_path / "sweep"
    shared = {"limit_train": 400, "limit_test": 50, "eval_train_size": 20}
    grid = {"epochs": [1], "batch_size": [20], "dtype": ["float32"], "lr": [0.001, 0.0005], "seed": [SEED, SEED + 1]}
    events = Events()

    def ctrl_c(event):
        raise KeyboardInterrupt

    events.when(lambda event: event["kind"] == "start", ctrl_c)  # as the first runs start
    with parallel_training(4, jobs=2, progress=False, on_event=events) as parallel:
        with pytest.raises(KeyboardInterrupt):
            run_sweep(shared, grid, out, parallel, data_dir=synthetic_dir, log=quiet)
    finished = list(out.glob("*/params.npz"))
    stopped = list(out.glob("*/checkpoint.npz"))
    assert stopped and len(finished) < 4

    capsys.readouterr()
    assert main(["sweep", "--quiet", "--resume", "--out", str(out), "--jobs", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("already trained") == len(finished)
    assert printed.count("continues from its checkpoint") == len(stopped)

    names = ["lr=0.001,seed=4", "lr=0.001,seed=5", "lr=0.0005,seed=4", "lr=0.0005,seed=5"]
    accuracy = {name: read_json(out / name / "history.json")["test_acc"] for name in names}
    summary = read_json(out / "summary.json")
    assert [row["name"] for row in summary["runs"]] == sorted(names, key=lambda name: -accuracy[name])
    assert [row["test_acc"] for row in summary["runs"]] == sorted(accuracy.values(), reverse=True)
    table = printed[printed.index("rank"):].splitlines()
    assert table[1].split()[-1] == summary["runs"][0]["name"]
    for group in summary["over_seeds"]:
        accs = [accuracy[f"{group['setting']},seed={seed}"] for seed in (SEED, SEED + 1)]
        assert group["mean_test_acc"] == pytest.approx(sum(accs) / 2)
        assert (group["min_test_acc"], group["max_test_acc"]) == (min(accs), max(accs))

    for name, lr, seed in (("lr=0.001,seed=4", "0.001", SEED), ("lr=0.0005,seed=5", "0.0005", SEED + 1)):
        single = tmp_path / f"single-{name}"
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("FASTCONV_NUM_THREADS", "1")
            assert train("--data-dir", synthetic_dir, "--out", single, "--seed", seed, "--lr", lr,
                         *options(epochs=1)) == 0
        assert_same_model(out / name, single)
        assert read_json(out / name / "config.json") == read_json(single / "config.json")
