"""The chapter-8 network built from fastconv.layers: trains, reproduces, agrees across backends."""
import numpy as np
import pytest

import fastconv
from fastconv.models import DeepConvNet
from fastconv.optimizer import Adam
from fastconv.trainer import Trainer


def synthetic_digits(n, seed=0):
    """Images whose class is the quadrant holding a bright blob: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 4, n)
    x = rng.uniform(0, 0.2, (n, 1, 28, 28))
    for i, label in enumerate(t):
        y0, x0 = 14 * (label // 2), 14 * (label % 2)
        x[i, 0, y0 + 3:y0 + 11, x0 + 3:x0 + 11] += 0.8
    return x, t


def train_losses(steps, seed, dtype=np.float64, batch=20):
    np.random.seed(seed)
    net = DeepConvNet(dtype=dtype)
    x, t = synthetic_digits(batch * 2)
    optimizer = Adam(lr=0.001)
    losses = []
    for step in range(steps):
        xb, tb = x[step % 2 * batch:(step % 2 + 1) * batch], t[step % 2 * batch:(step % 2 + 1) * batch]
        grads = net.gradient(xb, tb)
        optimizer.update(net.params, grads)
        losses.append(net.loss(xb, tb))
    return net, losses


def test_parameters_have_the_books_names_shapes_and_he_scale():
    np.random.seed(0)
    net = DeepConvNet()
    shapes = {k: v.shape for k, v in net.params.items()}
    assert shapes == {
        "W1": (16, 1, 3, 3), "b1": (16,), "W2": (16, 16, 3, 3), "b2": (16,),
        "W3": (32, 16, 3, 3), "b3": (32,), "W4": (32, 32, 3, 3), "b4": (32,),
        "W5": (64, 32, 3, 3), "b5": (64,), "W6": (64, 64, 3, 3), "b6": (64,),
        "W7": (1024, 50), "b7": (50,), "W8": (50, 10), "b8": (10,),
    }
    # He initialization: std sqrt(2 / fan_in), drawn from np.random in the order W1..W8
    np.random.seed(0)
    expected_W1 = np.sqrt(2.0 / 9) * np.random.randn(16, 1, 3, 3)
    expected_W2 = np.sqrt(2.0 / 144) * np.random.randn(16, 16, 3, 3)
    np.testing.assert_array_equal(net.params["W1"], expected_W1)
    np.testing.assert_array_equal(net.params["W2"], expected_W2)
    assert net.params["W7"].std() == pytest.approx(np.sqrt(2.0 / 1024), rel=0.05)


def test_training_decreases_the_loss(backend):
    _, losses = train_losses(steps=12, seed=3)
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])


def test_seeded_runs_are_reproducible(backend):
    _, first = train_losses(steps=3, seed=11)
    _, second = train_losses(steps=3, seed=11)
    assert first == second


def test_backends_agree_with_the_reference(fast_backend, dtype):
    net, losses = train_losses(steps=3, seed=5, dtype=dtype)
    with fastconv.use_backend("reference"):
        ref_net, ref_losses = train_losses(steps=3, seed=5, dtype=dtype)
        x, _ = synthetic_digits(50, seed=9)
        ref_scores = ref_net.predict(x)
    scores = net.predict(x)
    assert scores.dtype == dtype
    rtol = 1e-9 if dtype == np.float64 else 1e-3
    np.testing.assert_allclose(losses, ref_losses, rtol=rtol)
    np.testing.assert_allclose(scores, ref_scores, rtol=rtol, atol=rtol)
    np.testing.assert_array_equal(np.argmax(scores, axis=1), np.argmax(ref_scores, axis=1))


def test_float32_network_stays_float32(backend):
    np.random.seed(0)
    net = DeepConvNet(dtype=np.float32)
    x, t = synthetic_digits(4)
    grads = net.gradient(x, t)
    assert all(g.dtype == np.float32 for g in grads.values())
    Adam().update(net.params, grads)
    assert all(p.dtype == np.float32 for p in net.params.values())
    assert net.predict(x).dtype == np.float32


def test_trainer_runs_the_books_loop(backend, capsys):
    np.random.seed(1)
    net = DeepConvNet(dtype=np.float32)
    x, t = synthetic_digits(40)
    trainer = Trainer(net, x[:30], t[:30], x[30:], t[30:], epochs=2, mini_batch_size=10,
                      optimizer="Adam", optimizer_param={"lr": 0.001}, evaluate_sample_num_per_epoch=10)
    trainer.train()
    assert trainer.max_iter == 6 and len(trainer.train_loss_list) == 6
    assert len(trainer.train_acc_list) == len(trainer.test_acc_list) == 2
    assert "Final Test Accuracy" in capsys.readouterr().out


def test_trainer_rejects_unknown_optimizer():
    with pytest.raises(ValueError, match="unknown optimizer 'AdamW'"):
        Trainer(None, np.zeros((1, 1)), np.zeros(1), np.zeros((1, 1)), np.zeros(1), optimizer="AdamW")
