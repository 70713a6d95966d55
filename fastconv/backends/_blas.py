"""What the fast backends share about BLAS: a one-thread limit and the affine GEMMs.

Both fast backends run their matrix products inside their own worker threads,
one product per thread, on a BLAS held to one thread. A multi-threaded BLAS
taking turns with a parallel kernel leaves its threads spinning on the cores
the kernel needs (a train step of the chapter-8 network got 3 to 30 times
slower on 2 cores), so the limit is held for every product a backend runs.
"""
import contextlib
import threading

from threadpoolctl import ThreadpoolController

from fastconv.backends import reference


class SingleThreadedBlas:
    """Context manager: BLAS libraries run on one thread inside, as they were set outside.

    Nested and concurrent uses (kernels called from several Python threads)
    share one limit, lifted when the last of them leaves. OpenBLAS built on
    OpenMP is left alone: it already runs serially inside an OpenMP region,
    and limiting it would limit that region too.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._saved = []  # (library, its thread count before)
        self._libraries = None  # found on first use, once every BLAS in use is loaded

    @staticmethod
    def _find():
        controller = ThreadpoolController().select(user_api="blas")
        return [lib for lib in controller.lib_controllers
                if not (lib.internal_api == "openblas" and getattr(lib, "threading_layer", "") == "openmp")]

    @staticmethod
    def _claim(lib):
        """Let this thread set ``lib``'s thread count.

        threadpoolctl lets only the first thread that set the count of a
        pthreads OpenBLAS set it again and silently ignores the others; a
        kernel called from another thread then ran its products on a
        multi-threaded BLAS, whose results differ in the last bits.
        """
        clear = getattr(type(lib), "clear_controlling_thread", None)
        if clear is not None:
            clear(force=True)

    def __enter__(self):
        with self._lock:
            if self._users == 0:
                if self._libraries is None:
                    self._libraries = self._find()
                for lib in self._libraries:
                    self._claim(lib)
                self._saved = [(lib, lib.num_threads) for lib in self._libraries]
                for lib, threads in self._saved:
                    if threads != 1:
                        lib.set_num_threads(1)
            self._users += 1
        return self

    def __exit__(self, *exc_info):
        with self._lock:
            self._users -= 1
            if self._users == 0:
                for lib, threads in self._saved:
                    if threads != 1:
                        self._claim(lib)
                        lib.set_num_threads(threads)
                        self._claim(lib)  # and leave the limit to whichever thread sets it next
                self._saved = []


single_threaded_blas = SingleThreadedBlas()


# The affine layers are plain GEMMs (the reference's), small enough that one thread does them
# well; running them on the multi-threaded BLAS between the parallel kernels
# cost about a third of a float32 train step. Products of fewer multiply-adds
# than this run on the calling thread anyway (OpenBLAS's threshold: 4 x 65536),
# so they skip the limit and the few microseconds it costs to set and restore.
ONE_THREAD_PRODUCT = 1 << 18


def _limit_for(x, W):
    """The one-thread limit, or nothing for a product OpenBLAS runs on one thread anyway."""
    small = x.shape[0] * x.shape[1] * W.shape[1] < ONE_THREAD_PRODUCT
    return contextlib.nullcontext() if small else single_threaded_blas


def affine_forward(x, W, b):
    with _limit_for(x, W):
        return reference.affine_forward(x, W, b)


def affine_backward(dout, x, W):
    with _limit_for(x, W):
        return reference.affine_backward(dout, x, W)
