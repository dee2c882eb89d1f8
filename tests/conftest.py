"""Test set-up: 4 fake CPU devices and a compilation cache of this session, set before JAX is imported anywhere."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Compiling dominates the suite's time on XLA:CPU, and many tests compile the very same program (the runner tests'
# tiny synthetic runs, a run and its resumption, a subprocess and its re-run). JAX's persistent compilation cache in
# a directory new to this session compiles each such program once: a hit loads the executable XLA built for the same
# HLO and options, so every test still runs what it ran; nothing is reused from an earlier session. Subprocesses
# inherit it through the environment. JMTL_TEST_JAX_CACHE=0 leaves it out. The directory is removed at exit; one left
# by a killed session (its pid in the name, no longer running) is removed by the next session.
_PREFIX = "jmtl-tests-jax-cache-"


def _running(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  return True


if os.environ.get("JMTL_TEST_JAX_CACHE", "1") != "0" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  for _name in os.listdir(tempfile.gettempdir()):
    _pid = _name[len(_PREFIX) :].split("-")[0]
    if _name.startswith(_PREFIX) and _pid.isdigit() and not _running(int(_pid)):
      shutil.rmtree(os.path.join(tempfile.gettempdir(), _name), ignore_errors=True)
  _cache = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import jax  # noqa: E402 (after the environment above)

assert jax.device_count() == 4, f"the tests need 4 fake CPU devices, found {jax.devices()}"
