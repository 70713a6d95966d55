"""How many threads parallel kernels may use."""
import os

ENV_VAR = "FASTCONV_NUM_THREADS"


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
