"""A process that measures one implementation: ``python -m bench.worker SPEC_JSON``.

The report (``bench.report``) starts one worker per implementation and sends
it requests, one JSON object per line on stdin; each answer is one JSON line
on the stdout the worker started with (anything a library prints goes to
stderr instead). ``SPEC_JSON`` says what the process is:

- ``{"kind": "backend", "name": ..., "backend": ..., "variant": ...}``: one
  fastconv backend, made the process's backend as a user would, with an
  optional forced variant (``bench.variants``);
- ``{"kind": "torch", "name": "torch", "threads": N, "shapes": ...,
  "params_dir": ...}``: the PyTorch yardstick. fastconv is never imported
  in this process (``describe`` reports whether anything imported it);
- ``{"kind": "probe"}``: fastconv with no backend chosen, for the facts of
  the run (backends, shapes, machine) and the network's parameters.

Requests: ``describe``, ``prepare`` (a case), ``sample``, ``release``,
``params``, ``gemm_peak``, ``exit``. An exception becomes ``{"error": ...}``
and the worker carries on.
"""
import json
import os
import sys
import traceback
from pathlib import Path

import numpy as np

from bench import cases as bench_cases
from bench.benchmarks import _shapes
from bench.timing import LocalRunner, Settings


def _fastconv_factory(case):
    from bench.benchmarks import _network as net
    if case.kernel == bench_cases.TRAIN_STEP:
        return net.train_step_op(case.dtype), None
    if case.kernel == bench_cases.INFERENCE:
        return net.inference_ops(case.dtype, case.images)
    return net.KERNEL_OPS[case.kernel](case.layer_shape(), case.dtype), None


def _torch_factory(spec):
    from bench import torch_ops
    shapes = _shapes.network_from_dict(spec["shapes"])
    params = {}

    def network_params(dtype):
        if dtype not in params:
            with np.load(Path(spec["params_dir"]) / f"{dtype}.npz") as data:
                params[dtype] = {k: data[k] for k in data.files}
        return params[dtype]

    def factory(case):
        if case.kernel == bench_cases.TRAIN_STEP:
            return torch_ops.train_step_op(shapes, network_params(case.dtype), case.dtype), None
        if case.kernel == bench_cases.INFERENCE:
            return torch_ops.inference_ops(shapes, network_params(case.dtype), case.dtype, case.images)
        return torch_ops.KERNEL_OPS[case.kernel](case.layer_shape(), case.dtype), None

    return factory


class Worker:
    def __init__(self, spec):
        self.spec = spec
        self.kind = spec["kind"]
        self.variant_error = None
        if self.kind == "torch":
            from bench import torch_ops
            if torch_ops.load_torch(num_threads=spec.get("threads")) is None:
                raise RuntimeError("PyTorch does not import")
            self.runner = LocalRunner(spec["name"], _torch_factory(spec), kind="torch")
        else:
            import fastconv
            if self.kind == "backend":
                fastconv.set_backend(spec["backend"])
                if spec.get("variant"):
                    from bench import variants
                    self.variant_error = variants.force(spec["backend"], spec["variant"])
            self.runner = LocalRunner(spec.get("name", "probe"), _fastconv_factory)

    def describe(self):
        from bench import machine
        facts = {"pid": os.getpid(), "fastconv_imported": "fastconv" in sys.modules,
                 "variant_error": self.variant_error}
        if self.kind == "torch":
            facts.update(machine.torch_facts())
        else:
            facts.update(machine.fastconv_facts(with_shapes=self.kind == "probe"))
        return facts

    def prepare(self, case, settings):
        if self.variant_error:
            raise RuntimeError(self.variant_error)
        first, number = self.runner.prepare(bench_cases.from_dict(case), Settings(**settings))
        return {"first_call_s": first, "number": number}

    def sample(self, number, settle_time):
        return {"seconds": self.runner.sample(number, settle_time)}

    def release(self):
        self.runner.release()
        return {}

    def params(self, dtype, path):
        """Write the seeded network's parameters in ``dtype`` to ``path`` (an .npz) for the torch process."""
        from bench.benchmarks import _network as net
        network = net._seeded_network(np.dtype(dtype))
        np.savez(path, **{k: np.asarray(v) for k, v in network.params.items()})
        return {}

    def gemm_peak(self, dtype, n, repeat):
        from bench import machine
        return machine.gemm_peak(dtype, n, repeat)


def serve(spec, requests, answers):
    try:
        worker = Worker(spec)
    except Exception as exc:
        answers.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        answers.flush()
        return 1
    answers.write(json.dumps({"ready": True}) + "\n")
    answers.flush()
    for line in requests:
        request = json.loads(line)
        op = request.pop("op")
        if op == "exit":
            break
        try:
            answer = getattr(worker, op)(**request)
        except Exception as exc:  # reported to the report, which marks the benchmark failed
            if spec.get("verbose"):
                traceback.print_exc(file=sys.stderr)
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    # answers go to the stdout the process started with; whatever a library prints goes to stderr
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return serve(spec, sys.stdin, answers)


if __name__ == "__main__":
    sys.exit(main())
