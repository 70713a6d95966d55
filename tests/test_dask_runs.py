"""Models trained on a Dask cluster (``--dask``): a LocalCluster of two worker processes on this machine only."""
import functools
import logging
import os
import signal

import pytest

from fastconv.app import runs
from fastconv.app.parallel import parallel_training
from test_parallel_runs import (MODELS, SEED, Events, alone, assert_members_are_the_models_trained_alone,  # noqa: F401
                                ensemble_config, first_epoch_ends, options)
from test_train_app import offline, one_blas_thread, quiet, synthetic_dir, train  # noqa: F401

distributed = pytest.importorskip("distributed", reason="the dask extra is not installed")


@pytest.fixture(scope="module")
def cluster():
    """A scheduler and two single-threaded worker processes, on loopback, each running kernels on one thread.

    LocalCluster leaves variables for its workers in this process's environment
    (OPENBLAS_NUM_THREADS, MALLOC_TRIM_THRESHOLD_, ...), which processes started
    later would inherit; the environment is put back as it was.
    """
    environment = dict(os.environ)
    try:
        os.environ["FASTCONV_NUM_THREADS"] = "1"  # the workers' environment
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                      dashboard_address=None, silence_logs=logging.ERROR) as local:
            yield local
    finally:
        os.environ.clear()
        os.environ.update(environment)


@pytest.mark.slow
def test_members_on_a_local_cluster_are_the_models_trained_alone(synthetic_dir, tmp_path, alone, cluster, capsys):
    out = tmp_path / "ensemble"
    assert train("--data-dir", synthetic_dir, "--out", out, "--seed", SEED, "--ensemble", MODELS,
                 "--dask", cluster.scheduler_address, *options()) == 0
    printed = capsys.readouterr().out.splitlines()
    assert f"models trained on the Dask cluster at {cluster.scheduler_address} (2 workers now)" in printed[0]
    assert sum("1 kernel thread)" in line and "starts (process" in line for line in printed) == MODELS
    assert_members_are_the_models_trained_alone(out, alone)


@pytest.mark.slow
def test_a_killed_dask_worker_loses_no_finished_model(synthetic_dir, tmp_path, alone, cluster):
    events = Events()
    killed = []

    def kill(event):
        killed.append((event["key"], list(events.finished)))
        os.kill(events.starts(event["key"])[-1]["pid"], signal.SIGKILL)  # its nanny starts a new one

    events.when(first_epoch_ends(events, only_after_a_finished_model=True), kill)
    out = tmp_path / "ensemble"
    with parallel_training(MODELS, dask=cluster.scheduler_address, progress=False, on_event=events) as parallel:
        runs.run(ensemble_config(), out, data_dir=synthetic_dir, log=quiet, progress=False, parallel=parallel)

    (victim, finished_before), = killed
    assert finished_before and victim not in finished_before
    assert sorted(events.finished) == list(range(MODELS))
    for key in finished_before:
        assert len(events.starts(key)) == 1
    again = events.starts(victim)
    assert len(again) == 2 and again[1]["resumed"] and again[1]["epoch"] >= 1
    assert_members_are_the_models_trained_alone(out, alone)


def test_an_unreachable_scheduler_exits_2(synthetic_dir, tmp_path, monkeypatch, capsys):
    from fastconv.app import executors
    from test_train_app import closed_port

    # a scheduler that does not answer is given up after 1 s here (10 s by default)
    monkeypatch.setattr(executors, "dask_executor", functools.partial(executors.dask_executor, timeout=1))
    assert train("--data-dir", synthetic_dir, "--out", tmp_path / "run", "--dask",
                 f"tcp://127.0.0.1:{closed_port()}", *options()) == 2
    assert "cannot reach the Dask scheduler" in capsys.readouterr().err
