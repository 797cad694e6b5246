"""Shared test setup: one JAX compilation cache per session, hypothesis profile, the
../shared locator, and slow tests first."""

import os
import pathlib
import shutil
import sys
import tempfile

import hypothesis
import pytest

# One persistent JAX compilation cache for the whole session, shared by the xdist workers
# and every subprocess they start (train.py runs, notebooks, the CLI): the resume,
# multi-host and pipeline tests compile the same programs in several processes, and each
# program is then compiled once. A fresh folder per session (created by the first process,
# inherited by the others through the environment), removed at the end: nothing carries
# over between runs. Set JAX_COMPILATION_CACHE_DIR yourself to choose the folder (kept).
_CACHE_OWNER = "FQ_JAX_TEST_CACHE_OWNER"
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="fq-jax-test-jax-cache-")
  os.environ[_CACHE_OWNER] = str(os.getpid())
# Cache every program that took a tenth of a second to compile (default: 1 s), and bound
# the folder so that JAX takes a file lock around reads and writes (two workers share it).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 * 2**30))
if "jax" in sys.modules:  # a plugin imported jax first: the environment came too late
  import jax

  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
  jax.config.update("jax_compilation_cache_max_size", 4 * 2**30)


def pytest_unconfigure(config):
  del config
  if os.environ.get(_CACHE_OWNER) == str(os.getpid()):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# JAX compiles per shape: keep examples moderate and without deadlines.
hypothesis.settings.register_profile(
  "fq",
  deadline=None,
  max_examples=40,
  derandomize=True,
  suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fq"))

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(relative: str) -> pathlib.Path:
  """Path of a file in ../shared, or skip the test saying it is absent."""
  path = SHARED / relative
  if not path.exists():
    pytest.skip(f"../shared/{relative} is absent (real weights/data live outside the repo)")
  return path


def pytest_collection_modifyitems(config, items):
  """Runs the tests marked `slow` first, longest first; the rest keep their order.

  CI runs `pytest -n 2 --dist loadgroup` (pyproject.toml): the workers take work units in
  collection order, so starting the long tests first lets the many short ones fill in
  around them and both workers finish together, instead of one long test running alone
  at the end. `@pytest.mark.slow(seconds)` gives the estimated CPU seconds on an idle core
  (the sort key only; unmarked tests count as 0).
  """
  del config

  def cost(item) -> float:
    mark = item.get_closest_marker("slow")
    if mark is None:
      return 0.0
    return float(mark.args[0]) if mark.args else 1.0

  items[:] = sorted(items, key=cost, reverse=True)  # stable: equal costs keep their order
