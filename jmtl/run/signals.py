"""SIGINT/SIGTERM during a command: a flag, read at safe points, never an exception raised at a random point.

A signal handler that raises (Python's default for SIGINT) interrupts
whatever the main thread runs: an XLA compilation that calls back into
Python, a library's cleanup that swallows the exception, the interpreter's
import machinery. Tried on ``jmtl train`` before this module: of 12 SIGINTs
during start-up, 4 ended in a segfault (the KeyboardInterrupt left a
compilation half done, and the process crashed at exit) and others were
swallowed. Here the handler only records the signal; the runner reads it
where stopping is safe -- between the phases of start-up (:func:`check`)
and after each training step (the loop saves a checkpoint first) -- and
stops with :class:`Interrupted`, which the ``jmtl`` command prints in one
line before it exits with 128 + the signal number.

A second signal does not wait: in the ``jmtl`` command (``hard_exit``) it
prints one line and ends the process at once (``os._exit``: no traceback,
no interpreter teardown racing XLA's threads); in a library call, a second
SIGINT raises :class:`KeyboardInterrupt`, as Python's own handler would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
  """Raised after SIGINT/SIGTERM: at a step (its checkpoint written) or during start-up (``step`` is ``None``)."""

  def __init__(self, signum: int, step: int | None = None, *, when: str = ""):
    name = signal.Signals(signum).name
    if step is not None:
      text = f"interrupted by {name} at step {step}; checkpoint saved"
    else:
      text = f"interrupted by {name} {when or 'during start-up'}; nothing was lost"
    super().__init__(text)
    self.signum, self.step = signum, step


_state: dict = {"depth": 0, "caught": {}, "hard_exit": False, "prefix": "jmtl"}


def caught() -> int | None:
  """The signal number received since the outermost :func:`deferred` began, or ``None``."""
  return _state["caught"].get("signum")


def check(when: str = "") -> None:
  """Raises :class:`Interrupted` if a signal arrived (a safe point; ``when`` says where, e.g. "while loading data").

  Examples:
    >>> check()  # no signal: nothing happens
  """
  signum = caught()
  if signum is not None:
    raise Interrupted(signum, when=when)


def _handler(signum, frame):
  first = "signum" not in _state["caught"]
  if first:
    _state["caught"]["signum"] = int(signum)
    return
  if _state["hard_exit"]:
    name = signal.Signals(signum).name
    line = f"{_state['prefix']}: {name} again: stopped at once; the last checkpoint (if any) is kept\n"
    with contextlib.suppress(OSError):
      os.write(2, line.encode())
    os._exit(128 + signum)
  if signum == signal.SIGINT:
    raise KeyboardInterrupt


@contextlib.contextmanager
def deferred(*, hard_exit: bool = False, prefix: str = "jmtl", restore: bool = True) -> Iterator[dict]:
  """SIGINT/SIGTERM set a flag (yielded: ``{"signum": n}`` once one arrived) instead of raising.

  Nested uses share the outermost one's flag and handlers. Outside the main
  thread (where Python cannot set handlers) the flag stays empty. ``prefix``
  starts the line of a ``hard_exit``. With ``restore=False`` the handlers stay
  after the block: a process about to exit (the ``jmtl`` command) keeps them
  through the interpreter's teardown, where Python's own SIGINT handler would
  raise into whatever is being torn down.

  Examples:
    >>> with deferred() as flag:
    ...   os.kill(os.getpid(), signal.SIGTERM)
    ...   flag
    {'signum': 15}
  """
  if _state["depth"]:
    _state["depth"] += 1
    try:
      yield _state["caught"]
    finally:
      _state["depth"] -= 1
    return
  if threading.current_thread() is not threading.main_thread():
    yield {}
    return
  _state.update(depth=1, caught={}, hard_exit=hard_exit, prefix=prefix)
  old = {s: signal.signal(s, _handler) for s in SIGNALS}
  try:
    yield _state["caught"]
  finally:
    if restore:
      for s, h in old.items():
        signal.signal(s, h)
      _state.update(depth=0, caught={}, hard_exit=False)
