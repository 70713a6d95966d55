"""Seeded random calls of every kernel on one backend, compared with the reference backend.

    python tests/fuzz_kernels.py --calls 100000 --backend numba [--seed 0] [--batch 5000]

Call i is drawn from its own generator, ``default_rng([seed, i])``, so any
call can be replayed alone (``--first i --calls 1 --verbose``). Valid calls
(odd shapes, empty batches, strides, pads, both dtypes, non-contiguous
inputs, NaN and ties in pooling, workspaces handed from call to call,
weights replaced and inputs changed in place between forward and backward)
must match the reference; misuse (filters of another geometry, caches of
another backend or taken over by a later forward, bad shapes, dtypes,
strides, read-only gradients) must raise the documented TypeError or
ValueError. Calls run in child processes, a batch at a time, on 1, 2 or 3
threads in turn (``FASTCONV_NUM_THREADS``), each child reporting after every call: a child that dies is a crash of the call it was
running, and a new child continues after it. ``tests/test_fuzz.py`` runs it
on each fast backend in the slow test set.

Prints counts per kind of call and the totals; exits 1 on any mismatch,
wrong error or crash.
"""
import argparse
import collections
import json
import os
import subprocess
import sys
import time

import numpy as np

DTYPES = (np.float32, np.float64)
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


# --------------------------------------------------------------------------- comparisons

def close(got, expected):
    """got == expected within the backend tolerance (max-norm relative to max(1, max|expected|)), NaN where NaN."""
    got, expected = np.asarray(got), np.asarray(expected)
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return False
    if expected.size == 0:
        return True
    if not np.array_equal(np.isnan(got), np.isnan(expected)):
        return False
    finite = ~np.isnan(expected)
    if not np.array_equal(np.isinf(got[finite]) * np.sign(got[finite]), np.isinf(expected[finite]) * np.sign(expected[finite])):
        return False
    both = finite & np.isfinite(expected)
    if not both.any():
        return True
    scale = max(1.0, float(np.max(np.abs(expected[both]))))
    err = float(np.max(np.abs(got[both].astype(np.float64) - expected[both].astype(np.float64))))
    return err <= RTOL[expected.dtype] * scale


def all_close(got, expected):
    if isinstance(expected, tuple):
        return len(got) == len(expected) and all(close(g, e) for g, e in zip(got, expected))
    return close(got, expected)


def exact(got, expected):
    return np.asarray(got).dtype == np.asarray(expected).dtype and np.array_equal(got, expected, equal_nan=True)


# --------------------------------------------------------------------------- random cases

class Case:
    """One random call: draws its arguments, runs on the backend and on the reference."""

    def __init__(self, rng, kernels, fastconv, backend):
        self.rng = rng
        self.kernels = kernels
        self.fastconv = fastconv
        self.backend = backend

    def array(self, shape, dtype, kind="normal"):
        rng = self.rng
        if kind == "ties":
            a = rng.integers(-2, 3, size=shape).astype(dtype)
        else:
            a = rng.standard_normal(shape).astype(dtype)
        if kind == "special" and a.size:
            flat = a.reshape(-1)
            for value in (np.nan, np.inf, -np.inf):
                if rng.random() < 0.5:
                    flat[rng.integers(a.size)] = value
        if rng.random() < 0.2 and a.ndim >= 2 and a.size:
            # the same values in a non-contiguous array
            a = np.ascontiguousarray(np.swapaxes(a, -1, -2)).swapaxes(-1, -2)
        return a

    def geometry(self, pooling=False):
        """Mostly tiny problems; one in six as large as the vector tiles of the fast kernels and beyond."""
        rng = self.rng
        self.large = rng.random() < 1 / 6
        n = int(rng.choice([0, 1, 1, 2, 3, 4]))
        if self.large:
            c = int(rng.integers(5, 41))
        else:
            c = int(rng.choice([0, 1, 2, 3, 4], p=[0.05, 0.35, 0.25, 0.2, 0.15]))
        fh, fw = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        stride = int(rng.integers(1, 4))
        pad = int(rng.integers(0, min(fh, fw) // 2 + 1)) if pooling else int(rng.integers(0, 4))
        extent = 30 if self.large else 8
        h = int(rng.integers(max(1, fh - 2 * pad), fh + extent))
        w = int(rng.integers(max(1, fw - 2 * pad), fw + extent))
        return n, c, h, w, fh, fw, stride, pad

    def on(self, name, function, *args):
        with self.fastconv.use_backend(name):
            return function(*args)

    def both(self, function, *args):
        return self.on(self.backend, function, *args), self.on("reference", function, *args)

    # valid calls -------------------------------------------------------------------------------

    def im2col(self):
        n, c, h, w, fh, fw, stride, pad = self.geometry()
        x = self.array((n, c, h, w), self.rng.choice(DTYPES))
        got, expected = self.both(self.kernels.im2col, x, fh, fw, stride, pad)
        return exact(got, expected)

    def col2im(self):
        n, c, h, w, fh, fw, stride, pad = self.geometry()
        out_h, out_w = (h + 2 * pad - fh) // stride + 1, (w + 2 * pad - fw) // stride + 1
        col = self.array((n * out_h * out_w, c * fh * fw), self.rng.choice(DTYPES))
        got, expected = self.both(self.kernels.col2im, col, (n, c, h, w), fh, fw, stride, pad)
        return all_close(got, expected)

    def conv_problem(self):
        n, c, h, w, fh, fw, stride, pad = self.geometry()
        if self.large:
            fn = int(self.rng.integers(5, 41))
        else:
            fn = int(self.rng.choice([0, 1, 2, 3, 5, 8], p=[0.05, 0.25, 0.2, 0.2, 0.15, 0.15]))
        dtype_x, dtype_w = self.rng.choice(DTYPES), self.rng.choice(DTYPES)
        x = self.array((n, c, h, w), dtype_x)
        W = self.array((fn, c, fh, fw), dtype_w)
        b = self.array((fn,), dtype_w)
        return x, W, b, stride, pad

    def conv(self, workspace=None, change=None):
        """Forward and backward; ``change``: "x" changes x in place, "W" replaces W's values, in between."""
        kernels = self.kernels
        x, W, b, stride, pad = self.conv_problem()
        original_x = x.copy()
        with self.fastconv.use_backend(self.backend):
            out, cache = kernels.conv_forward(x, W, b, stride, pad, workspace)
        ref_out, ref_cache = self.on("reference", kernels.conv_forward, original_x, W, b, stride, pad)
        if change == "x":
            x[...] = self.array(x.shape, x.dtype)
        elif change == "W":
            W = self.array(W.shape, W.dtype)
        dout = self.array(out.shape, out.dtype)
        got = self.on(self.backend, kernels.conv_backward, dout, cache, W)
        expected = self.on("reference", kernels.conv_backward, dout, ref_cache, W)
        return all_close(out, ref_out) and all_close(got, expected), cache

    def pool_problem(self):
        n, c, h, w, ph, pw, stride, pad = self.geometry(pooling=True)
        kind = self.rng.choice(["normal", "ties", "special"], p=[0.5, 0.3, 0.2])
        return self.array((n, c, h, w), self.rng.choice(DTYPES), kind), ph, pw, stride, pad

    def maxpool(self, workspace=None, change=False):
        kernels = self.kernels
        x, ph, pw, stride, pad = self.pool_problem()
        original_x = x.copy()
        with self.fastconv.use_backend(self.backend):
            out, cache = kernels.maxpool_forward(x, ph, pw, stride, pad, workspace)
        ref_out, ref_cache = self.on("reference", kernels.maxpool_forward, original_x, ph, pw, stride, pad)
        if change:
            x[...] = -x
        dout = self.array(out.shape, out.dtype)
        got = self.on(self.backend, kernels.maxpool_backward, dout, cache)
        expected = self.on("reference", kernels.maxpool_backward, dout, ref_cache)
        return exact(out, ref_out) and all_close(got, expected), cache

    def relu(self):
        shape = tuple(int(s) for s in self.rng.integers(0, 7, size=self.rng.integers(1, 5)))
        x = self.array(shape, self.rng.choice(DTYPES), self.rng.choice(["normal", "ties", "special"]))
        (out, mask), (ref_out, ref_mask) = self.both(self.kernels.relu_forward, x)
        dout = self.array(shape, x.dtype)
        got = self.on(self.backend, self.kernels.relu_backward, dout.copy(), mask)
        expected = self.on("reference", self.kernels.relu_backward, dout.copy(), ref_mask)
        return exact(out, ref_out) and exact(mask, ref_mask) and exact(got, expected)

    def affine(self):
        n, d, m = (int(v) for v in self.rng.integers(0, 40, size=3))
        x = self.array((n, d), self.rng.choice(DTYPES))
        W = self.array((d, m), self.rng.choice(DTYPES))
        b = self.array((m,), W.dtype)
        got, expected = self.both(self.kernels.affine_forward, x, W, b)
        dout = self.array(got.shape, got.dtype)
        got_b, expected_b = self.both(self.kernels.affine_backward, dout, x, W)
        return all_close(got, expected) and all_close(got_b, expected_b)

    # misuse -----------------------------------------------------------------------------------

    def expect(self, errors, function, *args):
        """Whether ``function(*args)`` on the backend raises one of ``errors``."""
        try:
            self.on(self.backend, function, *args)
        except errors:
            return True
        except Exception:
            return False
        return False

    def wrong_filters(self):
        """Backward with filters of the same count and size but another shape or dtype."""
        x, W, b, stride, pad = self.conv_problem()
        out, cache = self.on(self.backend, self.kernels.conv_forward, x, W, b, stride, pad)
        fn, c, fh, fw = W.shape
        choices = [(fn, c, fw, fh), (fn, c * fh, 1, fw), (fn, 1, c * fh, fw), (fn + 1, c, fh, fw), (fn, c, fh * fw, 1)]
        shape = choices[self.rng.integers(len(choices))]
        if shape == W.shape:
            return True  # a square filter transposed is the same geometry: nothing to refuse
        dout = self.array(out.shape, out.dtype)
        return self.expect(ValueError, self.kernels.conv_backward, dout, cache, np.ones(shape, W.dtype))

    def foreign_cache(self):
        """A cache made on the reference used on the backend, and the other way round."""
        x, W, b, stride, pad = self.conv_problem()
        out, cache = self.on("reference", self.kernels.conv_forward, x, W, b, stride, pad)
        dout = self.array(out.shape, out.dtype)
        ok = self.expect(ValueError, self.kernels.conv_backward, dout, cache, W)
        x, ph, pw, stride, pad = self.pool_problem()
        out, cache = self.on(self.backend, self.kernels.maxpool_forward, x, ph, pw, stride, pad)
        try:
            self.on("reference", self.kernels.maxpool_backward, np.ones(out.shape, out.dtype), cache)
        except ValueError:
            return ok
        return False

    def taken_over(self):
        """Backward with a cache handed to a later forward as its workspace."""
        if self.rng.random() < 0.5:
            _, cache = self.conv()
            self.conv(workspace=cache)
            return self.expect(ValueError, self.kernels.conv_backward, np.ones(1), cache, np.ones((1, 1, 1, 1)))
        _, cache = self.maxpool()
        self.maxpool(workspace=cache)
        return self.expect(ValueError, self.kernels.maxpool_backward, np.ones((1, 1, 1, 1)), cache)

    def bad_arguments(self):
        kernels = self.kernels
        x = self.array((2, 3, 6, 6), np.float64)
        W = self.array((4, 3, 3, 3), np.float64)
        calls = [
            (ValueError, kernels.im2col, x, 0, 3),
            (ValueError, kernels.im2col, x, 7, 3),
            (ValueError, kernels.im2col, x, 3, 3, 2**63),
            (TypeError, kernels.im2col, x.astype(np.int32), 3, 3),
            (TypeError, kernels.im2col, x, 3, 2.5),
            (ValueError, kernels.im2col, x[0], 3, 3),
            (TypeError, kernels.col2im, np.zeros((32, 27)), (2, 3, "6", 6), 3, 3),
            (TypeError, kernels.col2im, np.zeros((32, 27)), (2, 3, 6.0, 6), 3, 3),
            (ValueError, kernels.col2im, np.zeros((31, 27)), (2, 3, 6, 6), 3, 3),
            (ValueError, kernels.conv_forward, x, W[:, :2], np.zeros(4)),
            (ValueError, kernels.conv_forward, x, W, np.zeros(3)),
            (ValueError, kernels.conv_forward, x, W, np.zeros(4), -1),
            (ValueError, kernels.conv_forward, x, W, np.zeros(4), 1, -1),
            (ValueError, kernels.maxpool_forward, x, 2, 2, 2, 2),
            (ValueError, kernels.maxpool_forward, np.broadcast_to(np.float32(0), (1, 1, 2**16, 2**15 + 1)), 2, 2),
            (TypeError, kernels.relu_forward, x.astype(np.float16)),
            (ValueError, kernels.relu_backward, x, np.zeros((2, 3), bool)),
            (ValueError, kernels.affine_forward, np.zeros((2, 3)), np.zeros((4, 5)), np.zeros(5)),
        ]
        read_only = np.ones((2, 3))
        read_only.flags.writeable = False
        calls.append((ValueError, kernels.relu_backward, read_only, np.zeros((2, 3), bool)))
        out, cache = self.on(self.backend, kernels.conv_forward, x, W, np.zeros(4), 1, 1)
        calls.append((ValueError, kernels.conv_backward, np.ones((2, 4, 6, 5)), cache, W))
        errors, function, *args = calls[self.rng.integers(len(calls))]
        return self.expect(errors, function, *args)

    # the mix ----------------------------------------------------------------------------------

    KINDS = {
        "im2col": 0.1, "col2im": 0.1, "conv": 0.17, "conv+workspace": 0.05, "conv+W replaced": 0.04,
        "conv+x changed": 0.04, "maxpool": 0.12, "maxpool+workspace": 0.04, "maxpool+x changed": 0.03,
        "relu": 0.07, "affine": 0.06, "misuse: filters": 0.04, "misuse: foreign cache": 0.04,
        "misuse: taken over": 0.04, "misuse: bad arguments": 0.03,
    }

    def run(self, kind):
        if kind == "conv":
            return self.conv()[0]
        if kind == "conv+workspace":
            _, cache = self.conv()
            return self.conv(workspace=cache)[0]
        if kind == "conv+W replaced":
            return self.conv(change="W")[0]
        if kind == "conv+x changed":
            return self.conv(change="x")[0]
        if kind == "maxpool":
            return self.maxpool()[0]
        if kind == "maxpool+workspace":
            _, cache = self.maxpool()
            return self.maxpool(workspace=cache)[0]
        if kind == "maxpool+x changed":
            return self.maxpool(change=True)[0]
        method = {"misuse: filters": self.wrong_filters, "misuse: foreign cache": self.foreign_cache,
                  "misuse: taken over": self.taken_over, "misuse: bad arguments": self.bad_arguments}.get(kind)
        return (method or getattr(self, kind))()


def draw_kind(rng):
    kinds = list(Case.KINDS)
    weights = np.array([Case.KINDS[k] for k in kinds])
    return kinds[rng.choice(len(kinds), p=weights / weights.sum())]


# --------------------------------------------------------------------------- child and parent

def child(backend, seed, first, stop, verbose):
    """Run calls [first, stop); one line per call on stdout: index, kind, outcome."""
    import warnings

    import fastconv
    from fastconv import kernels
    warnings.simplefilter("ignore")  # NaN and inf inputs make NumPy warn in the reference
    for i in range(first, stop):
        rng = np.random.default_rng([seed, i])
        kind = draw_kind(rng)
        try:
            outcome = "ok" if Case(rng, kernels, fastconv, backend).run(kind) else "mismatch"
        except Exception as exc:  # an exception where none belongs
            outcome = "error"
            if verbose:
                import traceback
                traceback.print_exc()
        print(json.dumps([i, kind, outcome]), flush=True)


def parent(args):
    counts = collections.defaultdict(collections.Counter)
    failures = []
    first, stop = args.first, args.first + args.calls
    started = time.time()
    children = 0
    here = os.path.dirname(os.path.abspath(__file__))
    while first < stop:
        last = min(stop, first + args.batch)
        command = [sys.executable, os.path.abspath(__file__), "--child", "--backend", args.backend,
                   "--seed", str(args.seed), "--first", str(first), "--calls", str(last - first)]
        if args.verbose:
            command.append("--verbose")
        # each child on another thread count: results must not depend on it
        env = dict(os.environ, FASTCONV_BACKEND=args.backend, FASTCONV_NUM_THREADS=str(1 + children % 3))
        children += 1
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, cwd=here)
        done = first - 1
        for line in process.stdout:
            i, kind, outcome = json.loads(line)
            counts[kind][outcome] += 1
            if outcome != "ok":
                failures.append((i, kind, outcome))
            done = i
        code = process.wait()
        if done + 1 < last:  # the child died during call done + 1
            i = done + 1
            kind = draw_kind(np.random.default_rng([args.seed, i]))
            counts[kind]["crash"] += 1
            failures.append((i, kind, f"crash (exit code {code})"))
            done = i
        first = done + 1
        if not args.quiet:
            print(f"{first - args.first} calls, {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    total = collections.Counter()
    print(f"backend {args.backend}, seed {args.seed}, calls [{args.first}, {stop})")
    for kind in Case.KINDS:
        total.update(counts[kind])
        print(f"  {kind:24s} " + " ".join(f"{k}={counts[kind][k]}" for k in ("ok", "mismatch", "error", "crash")))
    print(f"total: calls={sum(total.values())} ok={total['ok']} mismatches={total['mismatch']} "
          f"wrong errors={total['error']} crashes={total['crash']} ({time.time() - started:.0f} s)")
    for failure in failures[:50]:
        print("  failed:", *failure)
    return 1 if failures else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", required=True)
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first", type=int, default=0, help="index of the first call (to replay one)")
    parser.add_argument("--batch", type=int, default=5000, help="calls per child process")
    parser.add_argument("--verbose", action="store_true", help="print the traceback of unexpected errors")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.backend, args.seed, args.first, args.first + args.calls, args.verbose)
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
