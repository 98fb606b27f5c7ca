"""Stopping on signals: one mechanism for training, serving and TensorBoard.

    with stop_on((signal.SIGTERM, signal.SIGINT)) as stop:
        while not stop.wait(1.0):           # or, at a step boundary: if stop.received: ...
            ...
    # here the previous handlers (and signal mask) are back

A signal only records itself: `stop.received` becomes the number of the first one, and `stop` (an Event-like
object: is_set, wait, set) is set. Nothing is raised in the middle of the caller's code, so the caller decides
where it stops (training: at an optimizer-step boundary; serving: in its own loop; TensorBoard: in its wait).
`stop.set()` stops the same way from another thread (without a signal number).

Two ways to receive the signals:

  handlers (default)      Python handlers are installed, in the main thread only (in another thread nothing is
                          installed: only `stop.set()` stops). Children started meanwhile receive signals as usual
                          (exec resets handlers), so this suits processes that start compilers, data loaders or
                          TensorBoard.
  taken_by_thread=True    The signals are blocked in the calling thread, and so in every thread it starts later
                          (threads inherit the mask), and one thread takes them with sigtimedwait; handlers are
                          installed as well (main thread) for threads that existed before. For processes where a
                          library installs handlers of its own once we are running: ray.init installs SIGTERM
                          handlers (Python's sys.exit and a C++ crash reporter that aborts the process) that would
                          otherwise kill the process halfway through its orderly shutdown. Call it before starting
                          threads of your own. A blocked mask is inherited through fork and exec: start children
                          with `preexec_fn=lambda: unblock(stop.signals)` or they will not receive these signals.

On exit a handler is put back only if it is still ours (one installed inside the block by someone else stays), the
mask is restored, and signals still pending at that moment count as received rather than reaching the previous
handlers.

A handler never takes a lock: it may interrupt the main thread inside Event.wait, which holds the Event's lock, so
it only assigns `received`; `wait` looks at `received` at least every 0.1 s.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Iterable, Iterator, Optional, Tuple

POLL_S = 0.1  # how often wait() looks at what a handler recorded


class Stop:
    """Whether to stop, and which signal asked for it (None: not asked, or asked by set())."""

    def __init__(self, signals: Iterable[int] = ()):
        self.signals: Tuple[int, ...] = tuple(signals)
        self.received: Optional[int] = None
        self.received_at: Optional[float] = None  # time.monotonic() of the first signal
        self._event = threading.Event()

    def set(self, signum: Optional[int] = None) -> None:
        """Stop (from any thread, never from a signal handler)."""
        if signum is not None and self.received is None:
            self.received_at = time.monotonic()
            self.received = signum
        self._event.set()

    def is_set(self) -> bool:
        return self.received is not None or self._event.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Until stopped, at most `timeout` seconds; whether stopped."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            left = POLL_S if deadline is None else min(POLL_S, deadline - time.monotonic())
            if left <= 0:
                break
            self._event.wait(left)
        return self.is_set()

    @property
    def signal_name(self) -> Optional[str]:
        return signal.Signals(self.received).name if self.received is not None else None

    def _record(self, signum, frame) -> None:  # the signal handler: assignments, no lock
        if self.received is None:
            self.received_at = time.monotonic()
            self.received = signum


@contextlib.contextmanager
def stop_on(signals: Iterable[int], taken_by_thread: bool = False) -> Iterator[Stop]:
    """A `Stop` that these signals set while the block runs (see the module's docstring)."""
    stop = Stop(signals)
    in_main = threading.current_thread() is threading.main_thread()
    previous = {}
    if in_main:
        for sig in stop.signals:
            previous[sig] = signal.signal(sig, stop._record)
    mask, waiter, done = None, None, threading.Event()
    if taken_by_thread:
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, stop.signals)

        def take():
            while not done.is_set():
                signum = signal.sigtimedwait(stop.signals, 0.25)
                if signum is not None:
                    stop.set(signum.si_signo)

        waiter = threading.Thread(target=take, name="stop-signals", daemon=True)
        waiter.start()
    try:
        yield stop
    finally:
        if waiter is not None:
            done.set()
            waiter.join()
            while True:  # arrived after the waiter's last look: ours, not the previous handlers'
                pending = signal.sigtimedwait(stop.signals, 0)
                if pending is None:
                    break
                stop.set(pending.si_signo)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for sig, handler in previous.items():
            if signal.getsignal(sig) == stop._record:  # still ours
                signal.signal(sig, handler)


def unblock(signals: Iterable[int]) -> None:
    """Take these signals again in this thread (for a child before exec: a blocked mask is inherited)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, tuple(signals))
