"""Hold Ctrl-C back while a block that must not be cut in half runs."""
import contextlib
import signal
import threading


@contextlib.contextmanager
def deferred_interrupts():
    """Run the block whole: a SIGINT that arrives during it is raised as ``KeyboardInterrupt`` after it.

    Outside the main thread, or when SIGINT's handler was not installed by
    Python, signals cannot be caught here and the block runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None or previous is signal.SIG_IGN:
        yield
        return
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
