"""The workdir of a run: checks before anything is written, the stored config, atomic JSON files, the lock.

Layout (``jmtl train``)::

    jmtl.lock            while a run trains: its pid, host and start time (see :func:`locked`)
    config.json          the run's config; a re-run must match it (then it resumes)
    metrics.jsonl        train records every log_every steps, validation records every eval_every steps
    results.json         validation and test metrics of the selected model, Δm%, timing
    checkpoints/<step>/  orbax: params, best_params, train state, meta (data iterator, host state);
                         jmtl_digest.json: the SHA-256 of every file, checked on restore
    rejected_checkpoints/<step>/  steps a resume found damaged and skipped (kept for inspection)
    tensorboard/         event files
    plots/               curves.png, weights.png, grad_cosine.png
    baselines/           (baselines="auto") baselines.json and one single-task run per task
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from typing import Any

import ml_collections

from jmtl.run import config as config_lib
from jmtl.run.config import ConfigError

CONFIG = "config.json"
RESULTS = "results.json"
LOCK = "jmtl.lock"


def write_json(path: str, data: Any) -> None:
  """Writes ``data`` as JSON through a temporary file and a rename, so a kill never leaves half a file.

  Examples:
    >>> import os, tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), "x.json")
    >>> write_json(p, {"a": 1}); read_json(p, "x")
    {'a': 1}

  Under ``jax.distributed`` every process calls it and process 0 alone writes,
  between two barriers: no process is still reading the workdir when the
  file appears, and every process sees it once the call returns.
  """
  import jmtl.parallel

  jmtl.parallel.sync(f"before writing {os.path.basename(path)}")
  if jmtl.parallel.is_primary():
    _write_json(path, data)
  jmtl.parallel.sync(f"after writing {os.path.basename(path)}")


def _write_json(path: str, data: Any) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      json.dump(data, f, indent=1, sort_keys=True)
      f.write("\n")
    os.replace(tmp, path)
  except BaseException:  # a full disk, say: no half-written file is left (a stray one would block the next start)
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def read_json(path: str, what: str) -> Any:
  """Reads a JSON file; a missing or broken file is a :class:`ConfigError` naming it.

  Examples:
    >>> read_json("/nonexistent.json", "results")
    Traceback (most recent call last):
    jmtl.run.config.ConfigError: results: /nonexistent.json does not exist
  """
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise ConfigError(f"{what}: {path} does not exist") from e
  except (OSError, ValueError) as e:
    raise ConfigError(f"{what}: cannot read {path}: {e}") from e


def check_usable(workdir: str, create: bool = True) -> str:
  """The absolute workdir (created if ``create``); fails if it is missing, a file, unreadable or unwritable.

  Examples:
    >>> check_usable("/dev/null")
    Traceback (most recent call last):
    jmtl.run.config.ConfigError: workdir /dev/null exists and is not a directory
  """
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"workdir {path} exists and is not a directory")
  if not create and not os.path.isdir(path):
    raise ConfigError(f"workdir {path} does not exist")
  try:
    os.makedirs(path, exist_ok=True)
    os.listdir(path)
  except OSError as e:
    raise ConfigError(f"workdir {path} is not usable: {e.strerror or e}") from e
  if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
    raise ConfigError(f"workdir {path} is not readable and writable by this user")
  return path


def check_readable(workdir: str) -> str:
  """The absolute workdir of an existing run to read (``jmtl report``, ``jmtl eval``): it may be read-only.

  Examples:
    >>> check_readable("/nonexistent")
    Traceback (most recent call last):
    jmtl.run.config.ConfigError: workdir /nonexistent does not exist
  """
  path = os.path.abspath(os.path.expanduser(workdir))
  if not os.path.isdir(path):
    raise ConfigError(f"workdir {path} does not exist" if not os.path.exists(path) else f"{path} is not a directory")
  if not os.access(path, os.R_OK | os.X_OK):
    raise ConfigError(f"workdir {path} is not readable by this user")
  return path


def output_dir(path: str, out: str | None, what: str) -> str | None:
  """Where a read-only command writes ``what``: ``out`` (created) if given, else the workdir ``path`` if writable,
  else ``None`` (and one line on stderr says it was not written).

  Examples:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> output_dir(d, None, "plots") == d, output_dir(d, os.path.join(d, "out"), "plots") == os.path.join(d, "out")
    (True, True)
  """
  if out is not None:
    return check_usable(out)
  if os.access(path, os.W_OK):
    return path
  print(f"jmtl: workdir {path} is read-only: {what} not written (give --out DIR to write them there)", file=sys.stderr)
  return None


def open_run(workdir: str, config: ml_collections.ConfigDict, *, write: bool = True) -> str:
  """Prepares ``workdir`` for a run of ``config``: new (writes config.json) or the same run (resumes).

  Nothing in the directory is changed when this fails: a different config,
  or a non-empty directory that holds no jmtl run, is refused. With
  ``write=False`` it only checks (and creates the directory).

  Examples:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> _ = open_run(d, ml_collections.ConfigDict({"lr": 0.1})); sorted(os.listdir(d))
    ['config.json']
    >>> open_run(d, ml_collections.ConfigDict({"lr": 0.2}))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    jmtl.run.config.ConfigError: workdir ... holds a run with another config (lr: 0.1 -> 0.2); use a new --workdir
  """
  path = check_usable(workdir)
  stored = os.path.join(path, CONFIG)
  wanted = config_lib.to_dict(config)
  if os.path.exists(stored):
    have = read_json(stored, f"workdir {path}")
    diff = [d for d in config_lib.differences(have, wanted) if not _added_later(have, wanted, d)]
    if diff:
      shown = ", ".join(f"{d}: {_get(have, d)!r} -> {_get(wanted, d)!r}" for d in diff[:4])
      more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
      raise ConfigError(f"workdir {path} holds a run with another config ({shown}{more}); use a new --workdir")
    return path
  if set(os.listdir(path)) - {LOCK}:
    raise ConfigError(f"workdir {path} is not empty and holds no jmtl run (no {CONFIG}); use a new or empty directory")
  if write:
    write_json(stored, wanted)
  return path


#: Config groups added after runs were stored without them, and when a wanted group changes nothing such a run did:
#: a stored run without the group is the same run (``relations`` with ``every`` 0 tracks nothing).
ADDED_GROUPS = {
  "relations": lambda group: not (isinstance(group, dict) and group.get("every")),
  "cotrain": lambda group: not (isinstance(group, dict) and (group.get("members") or group.get("teachers"))),
}


def _added_later(have: dict, wanted: dict, dotted: str) -> bool:
  """Whether the difference ``dotted`` is only a group of :data:`ADDED_GROUPS` that the stored config predates.

  Examples:
    >>> _added_later({"lr": 1}, {"lr": 1, "relations": {"every": 0}}, "relations.every")
    True
    >>> _added_later({"lr": 1}, {"lr": 1, "relations": {"every": 10}}, "relations.every")
    False
  """
  group = dotted.split(".", maxsplit=1)[0]
  return group in ADDED_GROUPS and group not in have and ADDED_GROUPS[group](wanted.get(group))


def _get(data: dict, dotted: str) -> Any:
  for part in dotted.split("."):
    data = data.get(part) if isinstance(data, dict) else None
  return data


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config stored in a run's workdir (for ``jmtl eval`` and ``jmtl report``).

  Examples:
    >>> import tempfile
    >>> d = tempfile.mkdtemp(); _ = open_run(d, ml_collections.ConfigDict({"hidden": (8, 8)}))
    >>> load_run_config(d).hidden
    (8, 8)
  """
  path = check_readable(workdir)
  stored = os.path.join(path, CONFIG)
  if not os.path.exists(stored):
    raise ConfigError(f"workdir {path} holds no jmtl run (no {CONFIG})")
  return config_lib.from_dict(read_json(stored, f"workdir {path}"))


_held: dict[str, int] = {}  # the workdirs this process has locked, and how many times (locked() nests)


@contextlib.contextmanager
def locked(workdir: str) -> Iterator[str]:
  """Holds ``<workdir>/jmtl.lock`` (creating the workdir) for the duration; yields the absolute workdir.

  The lock is an ``fcntl.flock`` on that file, which holds the owner's pid,
  host and start time. The kernel drops a flock when its process ends in
  any way (SIGKILL included), so a lock is never left held by a dead process,
  and taking over a file left behind is free of races; the file is removed on
  release. A file left behind (the process was killed) is reported in one
  line and taken over. On NFS, Linux maps flock to byte-range locks that the
  server arbitrates (NFSv4, or v3 with lockd), so the lock holds across hosts
  there too; on a filesystem mounted without shared locks (``nolock``,
  ``local_lock=flock``, some FUSE) it only excludes writers on the same host.

  A directory this call created and that is empty when a :class:`ConfigError`
  leaves the block (a wrong argument or bad data, found before anything was
  written) is removed again: a user error leaves no empty workdir behind.

  Raises:
    ConfigError: when another process holds the lock (naming its pid and host).

  Examples:
    >>> import tempfile
    >>> with locked(tempfile.mkdtemp()) as d:
    ...   sorted(os.listdir(d))
    ['jmtl.lock']
    >>> new = os.path.join(tempfile.mkdtemp(), "run")
    >>> with locked(new):
    ...   raise ConfigError("a wrong field")
    Traceback (most recent call last):
    jmtl.run.config.ConfigError: a wrong field
    >>> os.path.exists(new)
    False
  """
  created = not os.path.exists(os.path.abspath(os.path.expanduser(workdir)))
  path = check_usable(workdir)
  if path in _held:
    _held[path] += 1
    try:
      yield path
    finally:
      _held[path] -= 1
    return
  lock = os.path.join(path, LOCK)
  fd = _acquire_once(path, lock)
  _held[path] = 1
  user_error = False
  try:
    yield path
  except ConfigError:
    user_error = True
    raise
  finally:
    del _held[path]
    if fd is not None:
      with contextlib.suppress(OSError):
        os.unlink(lock)  # while still held, so a waiting opener sees a new file (see _acquire)
        if created and user_error:
          os.rmdir(path)  # only if empty: nothing was written (fails, harmlessly, otherwise)
      os.close(fd)


def _acquire_once(path: str, lock: str) -> int | None:
  """:func:`_acquire` by the process that writes the workdir: under ``jax.distributed``, process 0 takes the lock
  for all the run's processes (the others get ``None``), and every process fails when it could not."""
  import jax
  import numpy as np

  import jmtl.parallel

  if jax.process_count() == 1:
    return _acquire(path, lock)
  fd, error = None, None
  if jmtl.parallel.is_primary():
    try:
      fd = _acquire(path, lock)
    except ConfigError as e:
      error = e
  if not bool(jmtl.parallel.from_primary(np.array(error is None))):
    raise error or ConfigError(f"workdir {path} is in use (process 0 of this run could not lock it; see its error)")
  return fd


def _acquire(path: str, lock: str) -> int:
  while True:
    try:
      fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise ConfigError(f"workdir {path}: cannot create its lock file {LOCK}: {e.strerror or e}") from e
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      owner = _owner(_read(fd))
      os.close(fd)
      raise ConfigError(
        f"workdir {path} is in use by {owner} (lock file {lock}); wait for that run to end, or stop it"
      ) from None
    except OSError as e:
      os.close(fd)
      raise ConfigError(f"workdir {path}: cannot lock {lock}: {e.strerror or e}") from e
    try:  # the owner may have removed the file between our open and our flock: then lock the new one
      same = os.path.samestat(os.fstat(fd), os.stat(lock))
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)
  previous = _read(fd)
  if previous:
    print(f"jmtl: workdir {path}: took over the stale lock of {_owner(previous)}, which is gone", file=sys.stderr)
  me = {
    "pid": os.getpid(),
    "host": socket.gethostname(),
    "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
  }
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
  except BaseException:  # a full disk, say: release it again rather than hold it unnamed
    with contextlib.suppress(OSError):
      os.unlink(lock)
    os.close(fd)
    raise
  return fd


def _read(fd: int) -> str:
  return os.pread(fd, 4096, 0).decode(errors="replace").strip()


def _owner(text: str) -> str:
  """``pid 12 on host h (since 2025-01-01T10:00:00+00:00)`` from a lock file's text."""
  try:
    data = json.loads(text)
    return f"pid {data['pid']} on host {data['host']} (since {data['started']})"
  except (ValueError, KeyError, TypeError):
    return "another process (its lock file is being written)" if not text else f"an unknown owner ({text[:60]!r})"
