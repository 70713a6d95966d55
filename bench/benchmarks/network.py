"""asv benchmarks of the whole network: one training step and inference, per backend and dtype."""
from . import _network as net
from .kernels import BACKENDS, DTYPES, activate

# asv times inference on fewer images than the report's 10000 to keep a run short; the time per image is
# what regressions change
INFERENCE_IMAGES = 1000


class TrainStep:
    params = [BACKENDS, DTYPES]
    param_names = ["backend", "dtype"]
    timeout = 300
    repeat = (3, 10, 20.0)

    def setup(self, backend, dtype):
        activate(backend)
        self.step = net.train_step_op(dtype)
        self.step()

    def time_train_step(self, backend, dtype):
        self.step()


class Inference:
    params = [BACKENDS, DTYPES]
    param_names = ["backend", "dtype"]
    timeout = 600
    number = 1
    repeat = (2, 5, 30.0)

    def setup(self, backend, dtype):
        activate(backend)
        self.predict, first_batch = net.inference_ops(dtype, INFERENCE_IMAGES)
        first_batch()

    def time_predict_1000_images(self, backend, dtype):
        self.predict()
