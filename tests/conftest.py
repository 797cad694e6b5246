"""Shared test setup: hypothesis profile and the ../shared locator."""

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
