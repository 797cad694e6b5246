"""Shared test setup: hypothesis profile, the ../shared locator, and slow tests first."""

import os
import pathlib

import hypothesis
import pytest

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
