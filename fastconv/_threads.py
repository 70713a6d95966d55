"""How many threads the fast backends' kernels use: one policy for both.

``get_num_threads()`` is the most threads a kernel may use (``FASTCONV_NUM_THREADS``,
else the CPUs this process may run on). ``threads_for(tasks, work, kind)`` is how
many of them a call wakes: one per task at most, and one per ``LEAST_WORK[kind]``
of work at most, since waking a sleeping thread costs tens of microseconds on an
idle machine and more on a busy one, where it has to wait for a core. Both
backends call it with the same kinds, so a kernel is cut the same way whichever
backend runs it. ``POLL_MICROSECONDS`` is how long an idle pool thread of either
backend polls for new work before it sleeps.
"""
import os

ENV_VAR = "FASTCONV_NUM_THREADS"

# Least work that earns a thread of its own, about 100 us of it. Convolutions: elements of output (or
# gradient) per thread. ReLU is bound by memory traffic: bytes of input per thread, from which a second thread
# pays (measured on the network's activations, float32 and float64). Pooling: input cells per thread.
LEAST_WORK = {
    "conv": 1 << 15,
    "unfold": 1 << 15,
    "pool": 1 << 17,
    "relu_forward": 3 << 19,
    "relu_backward": 5 << 19,
}

# An idle pool thread polls this long for the next call before it sleeps: a call that follows within it
# (the next layer of a network) starts without waking anybody.
POLL_MICROSECONDS = 300


def cpu_count():
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def get_num_threads():
    """``FASTCONV_NUM_THREADS`` if set, else the CPUs available to the process."""
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return cpu_count()
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{ENV_VAR} must be a positive integer, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{ENV_VAR} must be a positive integer, got {value!r}")
    return n


def threads_for(tasks, work, kind, most=None):
    """Threads worth waking for ``tasks`` independent tasks holding ``work`` units of ``LEAST_WORK[kind]``'s
    measure in all: at least 1, at most ``most`` (default ``get_num_threads()``), one per task and one per
    least work."""
    most = get_num_threads() if most is None else most
    return max(1, min(most, tasks, work // LEAST_WORK[kind]))
