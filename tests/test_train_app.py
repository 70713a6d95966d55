"""``fastconv train``: schedules, the training loop, checkpoints and resume, the command line."""
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastconv
from fastconv import datasets
from fastconv.app import runs, training
from fastconv.app._interrupts import deferred_interrupts
from fastconv.app.augment import RandomAffine, RandomElastic
from fastconv.app.cli import main
from fastconv.app.schedules import Constant, CosineDecay, StepDecay, make_schedule
from fastconv.app.settings import make_augmenter, split_validation
from fastconv.app.training import PHASES, TrainConfig, Training
from fastconv.datasets import write_idx
from fastconv.functions import softmax
from fastconv.models import DeepConvNet

KEYS = [f"{kind}{i}" for i in range(1, 9) for kind in ("W", "b")]

# A process started with SIGINT ignored (a background job, nohup, some CI runners) keeps ignoring it.
needs_sigint = pytest.mark.skipif(signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, None),
                                  reason="SIGINT is ignored in this process (background job, nohup or CI runner), "
                                         "so Ctrl-C cannot be delivered")


def closed_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Never look at the user's MNIST or the internet."""
    monkeypatch.delenv(datasets.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets, "MIRRORS", (f"http://127.0.0.1:{closed_port()}/",))


@pytest.fixture(autouse=True)
def one_blas_thread():
    """Matrix products here on one thread: the tiny ones of these runs take several times longer on more (on
    a busy machine far longer). Yields the BLAS libraries' settings as they were."""
    from threadpoolctl import threadpool_info, threadpool_limits

    before = threadpool_info()
    with threadpool_limits(1, user_api="blas"):
        yield before


@pytest.fixture
def blas_threads_as_started(one_blas_thread):
    """BLAS on the threads this process started with, for runs here compared bit for bit with runs in worker
    processes (whose rounding the thread count can change)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=one_blas_thread):
        yield


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    """Full-size MNIST files of random sparse images (enough to run the app, not to learn)."""
    folder = tmp_path_factory.mktemp("mnist-synthetic")
    rng = np.random.default_rng(0)
    for split, count in (("train", 60000), ("t10k", 10000)):
        images = np.zeros((count, 28, 28), dtype=np.uint8)
        images[:, 4:24:4, 4:24:4] = rng.integers(0, 256, (count, 5, 5), dtype=np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, count).astype(np.uint8))
    return folder


def small_data(n_train=50, n_test=30, seed=1):
    rng = np.random.default_rng(seed)
    return ((rng.random((n_train, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, n_train)),
            (rng.random((n_test, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, n_test)))


def quiet(*args):
    pass


# -- schedules ---------------------------------------------------------------------------------------


def test_constant_schedule():
    assert [Constant(0.01)(s) for s in (0, 5, 10 ** 6)] == [0.01] * 3


def test_step_schedule_divides_by_ten_at_half_and_three_quarters():
    schedule = StepDecay(1.0, total_steps=100)
    assert [schedule(s) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_cosine_schedule_by_hand():
    schedule = CosineDecay(1e-3, total_steps=11, lr_min=1e-5)
    assert schedule(0) == pytest.approx(1e-3)
    assert schedule(5) == pytest.approx((1e-3 + 1e-5) / 2)
    assert schedule(10) == pytest.approx(1e-5) and schedule(50) == pytest.approx(1e-5)
    # a quarter of the way: lr_min + (lr - lr_min) (1 + cos(pi/4)) / 2
    assert CosineDecay(1.0, 5, 0.0)(1) == pytest.approx((1 + math.sqrt(0.5)) / 2)


def test_make_schedule():
    assert make_schedule("cosine", 0.1, 10)(9) == pytest.approx(0.001)  # lr_min defaults to lr / 100
    assert make_schedule("none", 0.1, 10)(9) == 0.1
    with pytest.raises(ValueError, match="linear"):
        make_schedule("linear", 0.1, 10)


# -- settings ----------------------------------------------------------------------------------------


def test_book_recipe_is_the_books_chapter_8_run():
    config = TrainConfig.from_recipe("book")
    assert (config.epochs, config.batch_size, config.optimizer, config.lr) == (20, 100, "adam", 0.001)
    assert config.lr_schedule == "none" and not config.augment and config.dtype == "float64"


def test_best_recipe_and_overrides():
    config = TrainConfig.from_recipe("best", epochs=3, dtype="float32", lr_min=None)
    assert config.augment and config.lr_schedule == "cosine" and config.lr_min == 1e-5
    assert (config.epochs, config.dtype, config.optimizer) == (3, "float32", "adam")


def test_elastic_recipe_is_best_with_elastic_distortions_and_longer():
    config, best = TrainConfig.from_recipe("elastic"), TrainConfig.from_recipe("best")
    assert 30 <= config.epochs <= 40 and config.lr_schedule == "cosine" and config.augment
    assert config.elastic_alpha > 0 and config.elastic_sigma > 0 and config.cutout == 0 and config.validation is None
    assert (config.optimizer, config.lr, config.lr_min, config.batch_size) == (best.optimizer, best.lr, best.lr_min,
                                                                               best.batch_size)
    for recipe in ("book", "best"):  # without the augmentations that came after them, and without a split
        older = TrainConfig.from_recipe(recipe)
        assert (older.elastic_alpha, older.cutout, older.augment_strength, older.validation) == (0, 0, None, None)


@pytest.mark.parametrize("setting, message", [
    ({"epochs": 0}, "epochs"), ({"batch_size": -1}, "batch_size"), ({"optimizer": "lbfgs"}, "optimizer"),
    ({"lr": 0.0}, "lr"), ({"lr_min": 0.1}, "lr_min"), ({"dtype": "float16"}, "dtype"),
    ({"lr_schedule": "linear"}, "schedule"), ({"limit_train": 0}, "limit_train"), ({"ensemble": 0}, "ensemble"),
    ({"validation": 0}, "validation"), ({"validation": 100, "limit_train": 100}, "validation"),
    ({"validation": 60000}, "validation"), ({"elastic_alpha": -1.0}, "elastic"), ({"elastic_sigma": 0.0}, "elastic"),
    ({"cutout": -2}, "cut-out"), ({"cutout_prob": 1.5}, "cut-out"), ({"augment_strength": []}, "augment_strength"),
    ({"augment_strength": [1.0, -0.5]}, "augment_strength"),
    ({"augment": True, "augment_strength": [20.0]}, "strength"),
])
def test_settings_that_make_no_sense_are_refused(setting, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_recipe("book", **setting)


# -- the training loop -------------------------------------------------------------------------------


def test_epochs_visit_every_image_once_with_the_scheduled_learning_rate():
    config = TrainConfig.from_recipe("book", epochs=2, batch_size=20, dtype="float32", lr_schedule="cosine",
                                     eval_train_size=10)
    seen, rates = [], []

    def record(run):
        seen.append(run.order[(run.step - 1) * 20:run.step * 20])
        rates.append(run.optimizer.lr)

    run = Training(config, seed=0, data=small_data(n_train=50), log=quiet).run(on_step=record)
    assert run.steps_per_epoch == 3 and len(rates) == 6  # 20 + 20 + 10 images per epoch
    for epoch in (0, 1):
        assert sorted(np.concatenate(seen[3 * epoch:3 * epoch + 3]).tolist()) == list(range(50))
    expected = [1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * s / 5)) / 2 for s in range(6)]
    assert rates == pytest.approx(expected)


def test_history_records_accuracy_loss_and_time_split():
    config = TrainConfig.from_recipe("book", epochs=2, batch_size=25, dtype="float32", augment=True)
    run = Training(config, seed=0, data=small_data(), log=quiet).run()
    history = run.history
    assert [r["epoch"] for r in history["epochs"]] == [1, 2]
    assert len(history["step_loss"]) == 4 and all(np.isfinite(history["step_loss"]))
    for record in history["epochs"]:
        assert set(record["seconds"]) == set(PHASES)
        assert all(record["seconds"][phase] > 0 for phase in ("augment", "forward", "backward", "update", "evaluate"))
        assert record["total_seconds"] >= sum(record["seconds"].values()) - record["seconds"]["data"]
        assert 0 <= record["train_acc"] <= 1 and 0 <= record["test_acc"] <= 1
    # the test accuracy is that of the trained network's predictions
    x_test, t_test = small_data()[1]
    predicted = run.network.predict(x_test).argmax(axis=1)
    assert history["epochs"][-1]["test_acc"] == np.mean(predicted == t_test)


def test_augmentation_changes_the_training_batches(monkeypatch):
    fed = []
    original = DeepConvNet.loss

    def spy(self, x, t):
        fed.append(np.array(x))
        return original(self, x, t)

    monkeypatch.setattr(DeepConvNet, "loss", spy)
    (x_train, t_train), test = small_data(n_train=20)
    for augment in (False, True):
        fed.clear()
        config = TrainConfig.from_recipe("book", epochs=1, batch_size=20, dtype="float32", augment=augment)
        Training(config, seed=0, data=((x_train, t_train), test), log=quiet).run()
        assert fed[0].shape == (20, 1, 28, 28)
        training_images_as_given = sorted(map(bytes, fed[0])) == sorted(map(bytes, x_train))
        assert training_images_as_given != augment


@needs_sigint
def test_deferred_interrupts_hold_ctrl_c_until_the_block_ends():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            signal.raise_signal(signal.SIGINT)
            done.append("rest of the block")
    assert done == ["rest of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# -- validation split and augmentation ---------------------------------------------------------------


def test_the_validation_split_is_the_last_training_images_whatever_the_seed():
    (x, t), test = small_data(n_train=30, n_test=5)
    config = TrainConfig.from_recipe("book", epochs=1, batch_size=10, dtype="float32", validation=8,
                                     eval_train_size=5)
    (x_train, t_train), _, (x_val, t_val) = split_validation(((x, t), test), config)
    assert np.array_equal(x_train, x[:22]) and np.array_equal(t_train, t[:22])
    assert np.array_equal(x_val, x[22:]) and np.array_equal(t_val, t[22:])
    assert not {bytes(image) for image in x_train} & {bytes(image) for image in x_val}
    for seed in (0, 1):
        visited = []
        run = Training(config, seed=seed, data=((x, t), test), log=quiet)
        run.run(on_step=lambda run: visited.append(run.order))
        assert np.array_equal(run.x_val, x[22:]) and np.array_equal(run.x_train, x[:22])
        assert sorted(visited[0].tolist()) == list(range(22))  # no held-out image is trained on
    assert split_validation(((x, t), test), TrainConfig.from_recipe("book"))[2] is None


def test_load_data_holds_out_the_last_of_the_training_images_used(synthetic_dir):
    config = TrainConfig.from_recipe("book", limit_train=50, validation=10, limit_test=5)
    ((x_train, t_train), (x_test, _), (x_val, t_val)), _ = runs.load_data(config, synthetic_dir, download=False)
    (x_all, t_all), _ = datasets.load_mnist(flatten=False, data_dir=synthetic_dir)
    assert np.array_equal(x_train, x_all[:40]) and np.array_equal(t_train, t_all[:40]) and x_test.shape[0] == 5
    assert np.array_equal(x_val, x_all[40:50]) and np.array_equal(t_val, t_all[40:50])


def test_each_epoch_records_validation_accuracy_and_loss():
    config = TrainConfig.from_recipe("book", epochs=2, batch_size=10, dtype="float32", validation=10,
                                     eval_train_size=5)
    lines = []
    run = Training(config, seed=0, data=small_data(n_train=30, n_test=5), log=lines.append).run()
    assert len(run.history["step_loss"]) == 4  # 20 training images
    for record, line in zip(run.history["epochs"], lines):
        assert 0 <= record["val_acc"] <= 1 and record["val_loss"] > 0 and "val acc" in line
    assert record["val_acc"] == np.mean(run.val_proba.argmax(axis=1) == run.t_val)
    picked = run.val_proba[np.arange(10), run.t_val]
    assert record["val_loss"] == pytest.approx(-np.mean(np.log(picked + 1e-7)))
    lines.clear()
    plain = Training(TrainConfig.from_recipe("book", epochs=1, batch_size=10, dtype="float32", eval_train_size=5),
                     seed=0, data=small_data(n_train=30, n_test=5), log=lines.append).run()
    assert "val_acc" not in plain.history["epochs"][0] and "val acc" not in lines[0] and plain.val_proba is None


def test_the_augmenter_is_what_the_settings_ask_for():
    rng = np.random.default_rng(0)
    assert make_augmenter(TrainConfig.from_recipe("book"), rng) is None
    best = make_augmenter(TrainConfig.from_recipe("best"), rng)
    assert type(best) is RandomAffine and (best.shift, best.rotation, best.scale) == (2.0, 10.0, (0.9, 1.1))
    doubled = make_augmenter(TrainConfig.from_recipe("best"), rng, strength=2.0)
    assert (doubled.shift, doubled.rotation) == (4.0, 20.0) and doubled.scale == pytest.approx((0.8, 1.2))
    every = make_augmenter(TrainConfig.from_recipe("elastic", cutout=6, cutout_prob=0.25), rng, strength=0.5)
    assert [type(step).__name__ for step in every.steps] == ["RandomAffine", "RandomElastic", "RandomCutout"]
    assert (every.steps[1].alpha, every.steps[1].sigma, every.steps[2].size, every.steps[2].p) == (18, 6, 3, 0.25)
    assert all(step.rng is rng for step in every.steps)
    assert type(make_augmenter(TrainConfig.from_recipe("book", elastic_alpha=8.0), rng)) is RandomElastic


def test_without_the_newer_augmentations_a_run_draws_the_random_numbers_it_always_drew():
    config = TrainConfig.from_recipe("best", epochs=1, batch_size=10, dtype="float32", eval_train_size=5)
    run = Training(config, seed=7, data=small_data(n_train=20, n_test=5), log=quiet).run()
    replay = np.random.default_rng(7)
    replay.permutation(20)
    for _ in range(2):
        RandomAffine(2.0, 10.0, (0.9, 1.1), replay).draw(10)
    assert run.rng.bit_generator.state == replay.bit_generator.state


def test_each_model_of_an_ensemble_gets_its_augmentation_strength(monkeypatch):
    fed = []
    original = DeepConvNet.loss

    def spy(self, x, t):
        fed.append(np.array(x))
        return original(self, x, t)

    monkeypatch.setattr(DeepConvNet, "loss", spy)
    (x_train, t_train), test = small_data(n_train=10, n_test=5)
    config = TrainConfig.from_recipe("best", epochs=1, batch_size=10, dtype="float32", seed=4, ensemble=3,
                                     augment_strength=[0.0, 1.0], eval_train_size=5)
    for member, seed in enumerate((4, 5, 6)):  # strengths 0, 1, then 0 again
        fed.clear()
        run = Training(config, seed=seed, data=((x_train, t_train), test), log=quiet).run()
        assert run.history["augment_strength"] == [0.0, 1.0, 0.0][member]
        as_given = sorted(map(bytes, fed[0])) == sorted(map(bytes, x_train))
        assert as_given == (member != 1)


def test_an_ensemble_records_each_members_validation_accuracy_and_its_own(synthetic_dir, tmp_path):
    config = TrainConfig.from_recipe("best", epochs=1, batch_size=10, dtype="float32", limit_train=25, limit_test=5,
                                     validation=5, eval_train_size=5, ensemble=2, augment_strength=[0.5, 2.0],
                                     elastic_alpha=8.0, cutout=4)
    out = tmp_path / "ensemble"
    summary = runs.run(config, out, data_dir=synthetic_dir, download=False, progress=False, log=quiet)
    (x_all, t_all), _ = datasets.load_mnist(flatten=False, data_dir=synthetic_dir)
    x_val, t_val = x_all[20:25], t_all[20:25]
    probabilities = []
    for k, member in enumerate(summary["members"]):
        network = DeepConvNet(dtype=np.float32)
        network.load_params(out / f"member-{k + 1}" / "params.npz")
        probabilities.append(softmax(network.predict(x_val)))
        assert member["val_acc"] == np.mean(probabilities[-1].argmax(axis=1) == t_val)
        assert member["augment_strength"] == [0.5, 2.0][k]
        history = read_json(out / f"member-{k + 1}" / "history.json")
        assert history["val_images"] == 5 and history["val_acc"] == member["val_acc"]
    assert summary["val_images"] == 5
    assert summary["val_acc"] == np.mean(np.mean(probabilities, axis=0).argmax(axis=1) == t_val)
    assert read_json(out / "history.json")["val_acc"] == summary["val_acc"]


def test_a_finished_model_recorded_before_the_newer_settings_still_counts_as_trained(tmp_path):
    config = TrainConfig.from_recipe("best", epochs=1)
    newer = ("elastic_alpha", "elastic_sigma", "cutout", "cutout_prob", "augment_strength", "validation")
    older = {k: v for k, v in config.to_dict().items() if k not in newer}
    (tmp_path / "history.json").write_text(json.dumps({"completed": True, "seed": 0, "config": older}))
    (tmp_path / "params.npz").write_bytes(b"")
    assert runs.finished_history(tmp_path, config, 0)["config"] == older
    with pytest.raises(runs.RunError, match="other settings"):
        runs.finished_history(tmp_path, TrainConfig.from_recipe("best", epochs=1, elastic_alpha=8.0), 0)


# -- checkpoints and resume --------------------------------------------------------------------------


def resumable_config(optimizer="adam"):
    return TrainConfig.from_recipe("best", epochs=2, batch_size=5, optimizer=optimizer, dtype="float32",
                                   eval_train_size=5)


def resumable_data(n_train=15):
    """Training images for three steps of ``resumable_config`` per epoch."""
    return small_data(n_train=n_train, n_test=5)


def assert_same_run(a, b):
    for key in KEYS:
        assert np.array_equal(a.network.params[key], b.network.params[key]), key
    assert a.history["step_loss"] == b.history["step_loss"]
    assert [r["test_acc"] for r in a.history["epochs"]] == [r["test_acc"] for r in b.history["epochs"]]


def interrupt_after_step(step):
    def on_step(run):
        if run.epoch * run.steps_per_epoch + run.step == step:
            raise KeyboardInterrupt

    return on_step


def interrupted_then_resumed(tmp_path, config, data, on_step=None):
    checkpoint = tmp_path / "checkpoint.npz"
    first = Training(config, seed=3, data=data, checkpoint_path=checkpoint, log=quiet)
    with pytest.raises(KeyboardInterrupt):
        first.run(on_step=on_step)
    assert checkpoint.is_file()
    resumed = Training.resume(checkpoint, data, log=quiet)
    position = (resumed.epoch, resumed.step)
    return position, resumed.run()


@pytest.fixture
def reference():
    with fastconv.use_backend("reference"):  # bitwise repeatable
        yield


@pytest.mark.parametrize("step", [1, 3, 5])
def test_resume_after_a_step_continues_exactly(tmp_path, reference, step):
    data = resumable_data()
    uninterrupted = Training(resumable_config(), seed=3, data=data, log=quiet).run()
    (epoch, step_in_epoch), finished = interrupted_then_resumed(tmp_path, resumable_config(), data,
                                                                interrupt_after_step(step))
    assert epoch * finished.steps_per_epoch + step_in_epoch == step
    assert_same_run(finished, uninterrupted)


def test_resume_after_an_interrupt_inside_a_step(tmp_path, reference, monkeypatch):
    data = resumable_data()
    uninterrupted = Training(resumable_config(), seed=3, data=data, log=quiet).run()
    calls = []
    original = DeepConvNet.backward

    def backward_interrupted_on_third_call(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # forward done, random numbers drawn, parameters untouched
        return original(self, *args)

    monkeypatch.setattr(DeepConvNet, "backward", backward_interrupted_on_third_call)
    position, finished = interrupted_then_resumed(tmp_path, resumable_config(), data)
    assert position == (0, 2)
    assert_same_run(finished, uninterrupted)


def test_resume_after_an_interrupt_during_evaluation(tmp_path, reference, monkeypatch):
    data = resumable_data()
    uninterrupted = Training(resumable_config(), seed=3, data=data, log=quiet).run()
    original = training.predict_proba
    calls = []

    def interrupted_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # epoch 2's first scoring pass
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "predict_proba", interrupted_once)
    position, finished = interrupted_then_resumed(tmp_path, resumable_config(), data)
    assert position == (1, finished.steps_per_epoch)
    assert_same_run(finished, uninterrupted)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam"])
def test_resume_restores_every_optimizers_state(tmp_path, reference, optimizer):
    data = resumable_data()
    config = resumable_config(optimizer)
    uninterrupted = Training(config, seed=3, data=data, log=quiet).run()
    _, finished = interrupted_then_resumed(tmp_path, config, data, interrupt_after_step(2))
    assert_same_run(finished, uninterrupted)


def test_resume_with_a_validation_split_and_every_augmentation_continues_exactly(tmp_path, reference):
    config = TrainConfig.from_recipe("elastic", epochs=2, batch_size=5, dtype="float32", eval_train_size=5,
                                     validation=5, cutout=6, cutout_prob=0.7)
    data = resumable_data(n_train=20)  # 15 to train on: three steps an epoch
    uninterrupted = Training(config, seed=3, data=data, log=quiet).run()
    (epoch, step), finished = interrupted_then_resumed(tmp_path, config, data, interrupt_after_step(4))
    assert (epoch, step) == (1, 1)
    assert_same_run(finished, uninterrupted)
    assert [r["val_acc"] for r in finished.history["epochs"]] == [r["val_acc"] for r in uninterrupted.history["epochs"]]
    assert np.array_equal(finished.val_proba, uninterrupted.val_proba)


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path, reference):
    data = resumable_data(n_train=10)
    first = Training(resumable_config(), seed=3, data=data, checkpoint_path=tmp_path / "c.npz", log=quiet)
    with pytest.raises(KeyboardInterrupt):
        first.run(on_step=interrupt_after_step(1))
    with pytest.raises(ValueError, match="other settings"):
        Training.resume(tmp_path / "c.npz", data, config=resumable_config("sgd"))


# -- the command line --------------------------------------------------------------------------------


def train(*args):
    return main(["train", "--quiet", *map(str, args)])


TINY_TEST_IMAGES = 10


def tiny(data_dir, out, *extra):
    """Options of a run of 2 epochs of 2 steps on the reference backend, scored on ``TINY_TEST_IMAGES`` images."""
    return ["--data-dir", data_dir, "--out", out, "--limit-train", 20, "--limit-test", TINY_TEST_IMAGES,
            "--epochs", 2, "--batch-size", 10, "--eval-train-size", 10, "--dtype", "float32", "--backend",
            "reference", *extra]


def read_json(path):
    return json.loads(Path(path).read_text())


def test_train_writes_parameters_history_and_figures(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(*tiny(synthetic_dir, out)) == 0
    printed = capsys.readouterr().out

    for name in ("params.npz", "history.json", "curves.png", "misclassified.png", "config.json"):
        assert (out / name).is_file(), name
        assert name in printed or name == "config.json"
    for name in ("curves.png", "misclassified.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "checkpoint.npz").exists()
    assert "test accuracy" in printed and "wall time" in printed and "epoch   2/2" in printed

    history = read_json(out / "history.json")
    assert len(history["epochs"]) == 2 and len(history["step_loss"]) == 4
    assert set(history["epochs"][0]["seconds"]) == set(PHASES)
    assert history["config"]["dtype"] == "float32" and history["backend"] == "reference"
    # the saved parameters reproduce the reported accuracy on the test images
    (_, _), (x_test, t_test) = datasets.load_mnist(flatten=False, data_dir=synthetic_dir)
    network = DeepConvNet(dtype=np.float32)
    network.load_params(out / "params.npz")
    with fastconv.use_backend("reference"):
        predicted = network.predict(x_test[:TINY_TEST_IMAGES]).argmax(axis=1)
    assert history["test_acc"] == np.mean(predicted == t_test[:TINY_TEST_IMAGES])


def test_each_error_has_its_exit_code():
    from fastconv.app import exits
    from fastconv.app.checkpoint import CheckpointError
    from fastconv.app.executors import DaskMissing
    from fastconv.app.runs import RunError
    from fastconv.app.training import TrainingDiverged

    codes = {RunError("used --out"): 2, CheckpointError("damaged"): 2, DaskMissing("no dask"): 1,
             datasets.MNISTNotFoundError("no MNIST"): 3, datasets.MNISTFormatError("bad header"): 3,
             TrainingDiverged("nan"): 4, KeyboardInterrupt(): 130}
    for error, code in codes.items():
        assert exits.exit_code(error) == exits.exit_code(error, starting=True) == code, error
    assert (exits.EXIT_OK, exits.EXIT_FAILURE, exits.EXIT_USAGE) == (0, 1, 2)
    # while the command sets up, any bad value or unreachable place is a bad argument; later such errors propagate
    for error in (ValueError("--jobs must be at least 1"), OSError("cannot reach the Dask scheduler")):
        assert exits.exit_code(error, starting=True) == 2 and exits.exit_code(error) is None
    assert exits.exit_code(RuntimeError("a bug")) is None and exits.exit_code(RuntimeError(), starting=True) is None


def test_the_resume_command_repeats_where_and_how_the_run_ran():
    from fastconv.app.cli import build_parser
    from fastconv.app.exits import resume_command

    args = build_parser().parse_args(["train", "--out", "runs/a b", "--data-dir", "my data", "--no-download",
                                      "--backend", "reference", "--quiet", "--jobs", "2", "--epochs", "3"])
    assert resume_command("train", args.out, args) == ("fastconv train --resume --out 'runs/a b' --data-dir "
                                                       "'my data' --no-download --backend reference --quiet --jobs 2")
    args = build_parser().parse_args(["sweep", "--out", "runs/s", "--seed", "1", "2", "--dask", "tcp://h:8786"])
    assert resume_command("sweep", args.out, args) == "fastconv sweep --resume --out runs/s --dask tcp://h:8786"


def test_train_with_a_validation_split_and_the_newer_augmentations(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(*tiny(synthetic_dir, out, "--epochs", 1, "--validation", 5, "--elastic-alpha", 8, "--elastic-sigma", 3,
                       "--cutout", 4, "--cutout-prob", 0.25, "--augment-strength", 0.5)) == 0
    printed = capsys.readouterr().out
    config = read_json(out / "config.json")
    assert (config["validation"], config["elastic_alpha"], config["elastic_sigma"]) == (5, 8.0, 3.0)
    assert (config["cutout"], config["cutout_prob"], config["augment_strength"]) == (4, 0.25, [0.5])
    history = read_json(out / "history.json")
    assert history["val_images"] == 5 and history["val_acc"] == history["epochs"][0]["val_acc"]
    assert len(history["step_loss"]) == 2 and history["augment_strength"] == 0.5  # 15 images to train on
    assert "validating on the 5 after them" in printed and "val acc" in printed
    assert "validation accuracy:" in printed and "elastic (alpha 8, sigma 3) + cut-out 4 px (p 0.25)" in printed
    # the held-out images are training images 15..19, scored by the saved parameters
    (x_all, t_all), _ = datasets.load_mnist(flatten=False, data_dir=synthetic_dir)
    network = DeepConvNet(dtype=np.float32)
    network.load_params(out / "params.npz")
    with fastconv.use_backend("reference"):
        predicted = network.predict(x_all[15:20]).argmax(axis=1)
    assert history["val_acc"] == np.mean(predicted == t_all[15:20])


@pytest.mark.parametrize("args", [
    ["--epochs", "0"], ["--optimizer", "lbfgs"], ["--lr-schedule", "linear"], ["--dtype", "float16"],
    ["--backend", "no-such-backend"], ["--epochs", "two"], ["--bogus"], ["--validation", "0"],
    ["--validation", "60000"], ["--elastic-sigma", "0"], ["--cutout-prob", "2"], ["--augment-strength", "-1"],
])
def test_bad_arguments_exit_2(tmp_path, args, capsys):
    assert train("--out", tmp_path / "run", *args) == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resume_needs_a_run_to_resume(tmp_path, capsys):
    assert train("--resume") == 2
    assert "--resume needs --out" in capsys.readouterr().err
    assert train("--resume", "--out", tmp_path) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_missing_data_exits_3_saying_where_to_put_it(tmp_path, capsys):
    assert train("--out", tmp_path / "run", "--no-download") == 3
    err = capsys.readouterr().err
    assert "FASTCONV_DATA" in err and "train-images-idx3-ubyte.gz" in err
    # with downloads allowed, the (unreachable) mirror is tried and named
    assert train("--out", tmp_path / "run") == 3
    assert "127.0.0.1" in capsys.readouterr().err
    # a given --data-dir is the only place looked at: missing there is missing, no download
    assert train("--data-dir", tmp_path / "nowhere", "--out", tmp_path / "run") == 3
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nowhere'} does not exist" in err and "127.0.0.1" not in err
    assert not (tmp_path / "run").exists()  # a failed start leaves nothing behind


def test_unreadable_data_exits_3(synthetic_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in synthetic_dir.iterdir():
        (broken / path.name).symlink_to(path)
    (broken / "t10k-labels-idx1-ubyte.gz").unlink()
    write_idx(broken / "t10k-labels-idx1-ubyte.gz", np.zeros(10, dtype=np.uint8))
    assert train(*tiny(broken, tmp_path / "run")) == 3
    assert "holds 10 items, expected 10000" in capsys.readouterr().err


def interrupt_on_backward_call(monkeypatch, call):
    original = DeepConvNet.backward
    calls = []

    def backward(self, *args):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(DeepConvNet, "backward", backward)
    return lambda: monkeypatch.setattr(DeepConvNet, "backward", original)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_exits_130_and_resume_finishes_the_run(synthetic_dir, tmp_path, monkeypatch,
                                                                          capsys):
    assert train(*tiny(synthetic_dir, tmp_path / "straight", "--augment")) == 0

    out = tmp_path / "run"
    restore = interrupt_on_backward_call(monkeypatch, call=3)
    assert train(*tiny(synthetic_dir, out, "--augment")) == 130
    err = capsys.readouterr().err
    resume_command = err.strip().splitlines()[-1].split()
    assert "interrupted" in err and resume_command == [
        "fastconv", "train", "--resume", "--out", str(out), "--data-dir", str(synthetic_dir),
        "--backend", "reference", "--quiet"]
    assert (out / "checkpoint.npz").is_file() and not (out / "params.npz").exists()

    # a new run may not overwrite the unfinished one
    assert train(*tiny(synthetic_dir, out, "--augment")) == 2
    assert "unfinished run" in capsys.readouterr().err
    # a resumed run keeps its settings
    assert train("--resume", "--out", out, "--epochs", "5") == 2
    assert "--epochs 5 (the run has 2)" in capsys.readouterr().err

    restore()
    assert main(resume_command[1:]) == 0  # the command as printed
    assert "resuming" in capsys.readouterr().out
    assert not (out / "checkpoint.npz").exists()
    with np.load(out / "params.npz") as resumed, np.load(tmp_path / "straight" / "params.npz") as straight:
        for key in KEYS:
            assert np.array_equal(resumed[key], straight[key]), key
    step_losses = [read_json(folder / "history.json")["step_loss"] for folder in (out, tmp_path / "straight")]
    assert step_losses[0] == step_losses[1]


# -- output folders: never overwritten or mixed, nothing left by a failed start ----------------------


@pytest.mark.slow
def test_a_used_folder_is_refused_unless_overwrite_is_asked_for(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(*tiny(synthetic_dir, out, "--epochs", 1)) == 0
    first = (out / "params.npz").read_bytes()
    assert train(*tiny(synthetic_dir, out, "--epochs", 1, "--seed", 1)) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (out / "params.npz").read_bytes() == first and read_json(out / "config.json")["seed"] == 0

    (out / "notes.txt").write_text("mine")
    assert train(*tiny(synthetic_dir, out, "--epochs", 1, "--seed", 1, "--overwrite")) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert (out / "params.npz").read_bytes() == first

    (out / "notes.txt").unlink()
    assert train(*tiny(synthetic_dir, out, "--epochs", 1, "--seed", 1, "--overwrite")) == 0
    assert read_json(out / "config.json")["seed"] == 1 and read_json(out / "history.json")["seed"] == 1
    assert (out / "params.npz").read_bytes() != first


def test_a_new_run_that_fails_before_saving_anything_removes_what_it_wrote(synthetic_dir, tmp_path, monkeypatch):
    def broken(self, *args):
        raise RuntimeError("broken backward")

    monkeypatch.setattr(DeepConvNet, "backward", broken)
    out = tmp_path / "new" / "folders" / "run"
    with pytest.raises(RuntimeError, match="broken backward"):
        train(*tiny(synthetic_dir, out))
    assert list(tmp_path.iterdir()) == []


def test_a_resumed_member_trained_with_other_settings_is_refused(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "ensemble"  # trained here, model after model: the check is the same with worker processes
    assert train(*tiny(synthetic_dir, out, "--ensemble", 2, "--epochs", 1, "--jobs", 1)) == 0
    history = read_json(out / "member-2" / "history.json")
    history["config"]["lr"] = 0.5
    (out / "member-2" / "history.json").write_text(json.dumps(history))
    assert train("--resume", "--out", out, "--jobs", 1) == 2
    assert "member-2 holds a model trained with other settings" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_out_that_cannot_be_a_folder_exits_2(synthetic_dir, tmp_path, capsys, where):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" if where == "a file" else tmp_path / "file" / "run"
    assert train(*tiny(synthetic_dir, out)) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a POSIX user without root's rights")
def test_an_unwritable_out_exits_2(synthetic_dir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert train(*tiny(synthetic_dir, locked / "run")) == 2
    assert "no permission to write" in capsys.readouterr().err


def test_run_files_have_the_mode_new_files_get_and_no_temporaries_remain(synthetic_dir, tmp_path):
    previous = os.umask(0o027)
    try:
        assert train(*tiny(synthetic_dir, tmp_path / "run", "--epochs", 1)) == 0
    finally:
        os.umask(previous)
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "run").iterdir()}
    assert set(modes) == {"config.json", "data.json", "params.npz", "history.json", "curves.png",
                          "misclassified.png"}
    assert set(modes.values()) == {0o640}, modes


def test_atomic_writes_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    from fastconv.app import checkpoint

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(checkpoint.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b)))
    checkpoint.write_atomically(tmp_path / "file.json", lambda f: f.write(b"{}"))
    assert events[:2] == ["fsync", "replace"]
    assert [p.name for p in tmp_path.iterdir()] == ["file.json"]


def test_a_killed_write_leaves_a_temporary_that_the_next_start_removes(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = ("import os, sys\n"
            "from fastconv.app.checkpoint import write_atomically\n"
            "write_atomically(sys.argv[1], lambda f: (f.write(b'partial'), f.flush(), os._exit(9)))\n")
    out.mkdir()
    killed = subprocess.run([sys.executable, "-c", code, str(out / "checkpoint.npz")], timeout=120)
    assert killed.returncode == 9
    left = [p.name for p in out.iterdir()]
    assert len(left) == 1 and left[0].startswith(".checkpoint.npz.") and left[0].endswith(".tmp")
    assert train(*tiny(synthetic_dir, out, "--epochs", 1)) == 0  # a folder holding only leftovers is empty
    assert not list(out.glob(".*.tmp"))


# -- the data of a resumed run -----------------------------------------------------------------------


def copy_of(folder, dest, relabel_seed=None):
    dest.mkdir()
    for path in folder.iterdir():
        (dest / path.name).symlink_to(path)
    if relabel_seed is not None:
        (dest / "train-labels-idx1-ubyte.gz").unlink()
        labels = np.random.default_rng(relabel_seed).integers(0, 10, 60000).astype(np.uint8)
        write_idx(dest / "train-labels-idx1-ubyte.gz", labels)
    return dest


def test_a_resumed_run_finds_its_own_data_and_refuses_other_files(synthetic_dir, tmp_path, monkeypatch, capsys):
    data = copy_of(synthetic_dir, tmp_path / "data")
    other = copy_of(synthetic_dir, tmp_path / "other", relabel_seed=9)
    out = tmp_path / "run"
    restore = interrupt_on_backward_call(monkeypatch, call=2)
    assert train(*tiny(data, out)) == 130
    restore()
    recorded = read_json(out / "data.json")
    assert recorded["folder"] == str(data.resolve())
    assert set(recorded["sha256"]) == {name for name, _, _ in datasets.MNIST_FILES.values()}

    # other files, given or found elsewhere, are refused
    assert train("--resume", "--out", out, "--data-dir", other) == 2
    assert "train-labels-idx1-ubyte.gz differ" in capsys.readouterr().err
    monkeypatch.setenv(datasets.ENV_VAR, str(other))
    data.rename(tmp_path / "moved")
    assert train("--resume", "--out", out) == 2
    assert "not the ones this run trained on" in capsys.readouterr().err
    # without --data-dir the run looks where it first found its data
    (tmp_path / "moved").rename(data)
    assert train("--resume", "--out", out) == 0
    assert (out / "params.npz").is_file() and not (out / "checkpoint.npz").exists()


def test_a_truncated_checkpoint_exits_2_naming_it(synthetic_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    restore = interrupt_on_backward_call(monkeypatch, call=3)
    assert train(*tiny(synthetic_dir, out)) == 130
    restore()
    checkpoint = out / "checkpoint.npz"
    checkpoint.write_bytes(checkpoint.read_bytes()[:3000])
    capsys.readouterr()
    assert train("--resume", "--out", out) == 2
    err = capsys.readouterr().err
    assert f"{checkpoint} is not a readable checkpoint" in err and "Traceback" not in err


@pytest.mark.parametrize("lr", ["inf", "nan", "-inf"])
def test_a_learning_rate_that_is_not_finite_exits_2(synthetic_dir, tmp_path, capsys, lr):
    assert train(*tiny(synthetic_dir, tmp_path / "run", f"--lr={lr}")) == 2
    assert "finite lr" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:overflow|invalid value:RuntimeWarning")
def test_a_diverging_run_exits_4_and_leaves_nothing_behind(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(*tiny(synthetic_dir, out, "--optimizer", "sgd", "--lr", "1e30")) == 4
    err = capsys.readouterr().err
    assert "the training loss became" in err and "lower learning rate" in err
    assert not out.exists()


# -- what the log says -------------------------------------------------------------------------------


def test_the_log_says_the_settings_in_words(synthetic_dir, tmp_path, capsys):
    assert train(*tiny(synthetic_dir, tmp_path / "run", "--epochs", 1, "--lr-schedule", "cosine")) == 0
    first, note = capsys.readouterr().out.splitlines()[:2]
    assert "1 epoch," in first and "1 epochs" not in first
    assert "adam lr 0.001 decayed along a cosine to 1e-05" in first and str(synthetic_dir) in first
    assert "dropout" in note


def test_describe_names_each_schedule():
    config = TrainConfig.from_recipe("book", epochs=4)
    assert "adam lr 0.001, constant" in training.describe(config, 1000)
    config = TrainConfig.from_recipe("book", epochs=4, lr_schedule="step")
    assert "x0.1 at steps 20 and 30" in training.describe(config, 1000)  # 40 steps: at 1/2 and 3/4


def test_time_left_counts_the_remaining_steps_and_evaluations(monkeypatch, reference):
    clock = iter(range(10 ** 6))  # every reading of the clock one second later than the one before
    monkeypatch.setattr(training.time, "perf_counter", lambda: float(next(clock)))
    config = TrainConfig.from_recipe("book", epochs=3, batch_size=10, dtype="float32", eval_train_size=10)
    seen = []

    def record(run):
        records = run.history["epochs"]
        step_seconds = (sum(r["total_seconds"] - r["seconds"]["evaluate"] for r in records)
                        + run.totals["train_seconds"])
        steps_done = len(records) * run.steps_per_epoch + run.step
        seen.append((run.seconds_left(), records[-1]["seconds"]["evaluate"] if records else None,
                     step_seconds / steps_done, run.epoch, run.step))

    Training(config, seed=0, data=small_data(n_train=20, n_test=10), log=quiet).run(on_step=record)
    # 3 epochs of 2 steps; after epoch 1 an evaluation has been timed
    left, evaluation, per_step, epoch, step = seen[2]
    assert (epoch, step) == (1, 1) and evaluation > 0
    assert left == pytest.approx(3 * per_step + 2 * evaluation)  # 3 steps and 2 evaluations to go
    left, evaluation, _, epoch, step = seen[-1]
    assert (epoch, step) == (2, 2) and left == pytest.approx(evaluation)  # only the last evaluation


def test_ensemble_averages_the_members_softmax(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "ensemble"
    assert train(*tiny(synthetic_dir, out, "--ensemble", 2, "--epochs", 1, "--seed", 5)) == 0
    printed = capsys.readouterr().out
    summary = read_json(out / "history.json")
    assert [m["seed"] for m in summary["members"]] == [5, 6]

    (_, _), (x_test, t_test) = datasets.load_mnist(flatten=False, data_dir=synthetic_dir)
    x_test, t_test = x_test[:TINY_TEST_IMAGES], t_test[:TINY_TEST_IMAGES]
    probabilities = []
    with fastconv.use_backend("reference"):
        for k, member in enumerate(summary["members"]):
            folder = out / f"member-{k + 1}"
            assert member["folder"] == str(folder)
            for name in ("params.npz", "history.json", "curves.png"):
                assert (folder / name).is_file()
            network = DeepConvNet(dtype=np.float32)
            network.load_params(folder / "params.npz")
            proba = softmax(network.predict(x_test))
            assert member["test_acc"] == np.mean(proba.argmax(axis=1) == t_test)
            probabilities.append(proba)
    assert summary["test_acc"] == np.mean(np.mean(probabilities, axis=0).argmax(axis=1) == t_test)
    assert "ensemble of 2" in printed and "member 2 (seed 6) test accuracy" in printed
    assert not np.array_equal(*[np.load(out / f"member-{k}" / "params.npz")["W1"] for k in (1, 2)])


@pytest.mark.slow
def test_single_runs_combine_into_the_ensemble_they_would_be_members_of(synthetic_dir, tmp_path, capsys,
                                                                       blas_threads_as_started):
    import shutil
    for seed in (5, 6):
        assert train(*tiny(synthetic_dir, tmp_path / f"s{seed}", "--epochs", 1, "--seed", seed)) == 0
    assembled = tmp_path / "assembled"
    assembled.mkdir()
    config = read_json(tmp_path / "s5" / "config.json")
    config["ensemble"] = 2
    (assembled / "config.json").write_text(json.dumps(config))
    for k, seed in enumerate((5, 6), start=1):
        (assembled / f"member-{k}").mkdir()
        for name in ("params.npz", "history.json", "curves.png"):
            shutil.copy(tmp_path / f"s{seed}" / name, assembled / f"member-{k}" / name)
    capsys.readouterr()
    assert train("--resume", "--out", assembled, "--data-dir", synthetic_dir) == 0
    assert "member 2/2 (seed 6): already trained" in capsys.readouterr().out

    direct = tmp_path / "direct"
    assert train(*tiny(synthetic_dir, direct, "--epochs", 1, "--seed", 5, "--ensemble", 2)) == 0
    for k in (1, 2):  # the same members, so the same ensemble
        with np.load(assembled / f"member-{k}" / "params.npz") as a, np.load(direct / f"member-{k}" / "params.npz") as b:
            for key in KEYS:
                assert np.array_equal(a[key], b[key]), (k, key)
    assert read_json(assembled / "history.json")["test_acc"] == read_json(direct / "history.json")["test_acc"]


def test_recipe_best_sets_augmentation_and_cosine_decay(synthetic_dir, tmp_path):
    out = tmp_path / "best"
    assert train(*tiny(synthetic_dir, out, "--recipe", "best", "--epochs", 1)) == 0
    config = read_json(out / "config.json")
    assert config["recipe"] == "best" and config["augment"] and config["lr_schedule"] == "cosine"
    assert config["epochs"] == 1  # given options override the recipe
    assert read_json(out / "history.json")["epochs"][0]["seconds"]["augment"] > 0


@pytest.mark.slow
@needs_sigint
def test_sigint_to_the_process_checkpoints_and_exits_130(synthetic_dir, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-u", "-m", "fastconv", "train", "--quiet", "--data-dir", str(synthetic_dir),
               "--out", str(out), "--limit-train", "40", "--limit-test", "20", "--batch-size", "20",
               "--eval-train-size", "20", "--epochs", "1000", "--dtype", "float32", "--backend", "reference"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONWARNINGS="ignore"))
    try:
        for line in process.stdout:
            if line.startswith("epoch"):
                break
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "interrupted: a checkpoint is saved" in err
    assert (out / "checkpoint.npz").is_file()
    resumed = Training.resume(out / "checkpoint.npz", small_data(n_train=40), log=quiet)
    assert resumed.epoch >= 1 and len(resumed.history["epochs"]) == resumed.epoch


@pytest.mark.slow
@pytest.mark.mnist
def test_short_real_training_beats_85_percent(mnist_dir, tmp_path):
    # 3000 images, 2 epochs of batches of 20 (300 steps): about 88 % on 1000 test images
    out = tmp_path / "real"
    assert train("--data-dir", mnist_dir, "--out", out, "--limit-train", 3000, "--limit-test", 1000,
                 "--epochs", 2, "--batch-size", 20, "--dtype", "float32", "--eval-train-size", 1000) == 0
    history = read_json(out / "history.json")
    assert history["test_images"] == 1000
    assert history["test_acc"] > 0.85, history["epochs"]


def test_layers_and_book_modules_import_without_the_app_dependencies():
    # A fresh interpreter where matplotlib and tqdm cannot be imported: the layer user's install.
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('matplotlib', 'tqdm'):\n"
            "            raise ImportError(f'blocked: {name}')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import fastconv.layers, fastconv.util, fastconv.functions, fastconv.optimizer, fastconv.trainer\n"
            "import fastconv.datasets, fastconv.models\n"
            "from fastconv.app.cli import main\n"
            "sys.exit(main(['train', '--epochs', '1']))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert 'pip install "fastconv[app]"' in result.stderr


def test_the_app_modules_import_one_another_without_a_cycle():
    # every import between fastconv/app modules, at module level or inside functions
    import ast

    folder = Path(training.__file__).parent
    modules = {path.stem: path for path in folder.glob("*.py") if path.stem != "__init__"}
    imports = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        imports[name] = {full.rsplit(".", 1)[1] for full in found
                         if full.startswith("fastconv.app.") and full.count(".") == 2} & set(modules) - {name}

    def reachable(start):
        seen, todo = set(), list(imports[start])
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo += imports[name]
        return seen

    assert "exits" in imports["cli"] and "sweep" in imports["cli"]
    assert [name for name in sorted(modules) if name in reachable(name)] == []
