"""The layering of docs/architecture.md, checked on the source: nothing imports upward.

Layers, bottom up: core (fq_jax/_src) < codec < models, data < integer < pipeline < cli. A module
may import its own layer and the layers below. `fq_jax/__init__.py` (the public facade) and
`fq_jax/plotting.py` (an edge helper) sit outside the stack.
"""

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "fq_jax"

# package prefix -> layer rank
LAYERS = {
  "fq_jax._src": 0,
  "fq_jax.codec": 1,
  "fq_jax.models": 2,
  "fq_jax.data": 2,
  "fq_jax.integer": 3,
  "fq_jax.pipeline": 4,
  "fq_jax.cli": 5,
  "fq_jax.__main__": 5,
}
OUTSIDE = {"fq_jax", "fq_jax.plotting"}  # the facade and the plotting edge
FACADE_USERS = 4  # the facade re-exports layers 0-3: only the pipeline and the CLI may use it
MAX_MODULE_LINES = 600


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT.parent).with_suffix("").parts
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _rank(module: str) -> int | None:
  best = None
  for prefix, rank in LAYERS.items():
    if module == prefix or module.startswith(prefix + "."):
      best = rank
  return best


def _imports(path: pathlib.Path):
  tree = ast.parse(path.read_text())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module == "fq_jax":  # `from fq_jax import models` imports fq_jax.models
        for alias in node.names:
          sub = f"fq_jax.{alias.name}"
          yield node.lineno, sub if _rank(sub) is not None or sub in OUTSIDE else "fq_jax"
      else:
        yield node.lineno, node.module


MODULES = sorted(ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_no_upward_imports(path):
  name = _module_name(path)
  if name in OUTSIDE:
    return
  rank = _rank(name)
  assert rank is not None, f"{name} belongs to no layer: add it to docs/architecture.md and here"
  bad = []
  for line, target in _imports(path):
    if target == "fq_jax" and rank < FACADE_USERS:
      bad.append(f"line {line}: imports the facade `fq_jax` (import the submodule instead)")
      continue
    if target == "fq_jax":
      continue
    if target in OUTSIDE:
      bad.append(f"line {line}: imports {target}")
      continue
    target_rank = _rank(target)
    if target_rank is not None and target_rank > rank:
      bad.append(f"line {line}: imports {target} (a layer above)")
  assert not bad, f"{name}: " + "; ".join(bad)


def test_core_imports_only_its_dependencies():
  allowed = {"jax", "jaxlib", "optax", "flax", "numpy", "ml_dtypes", "fq_jax"}
  stdlib = set(sys.stdlib_module_names) - {"os", "io", "subprocess", "socket", "shutil"}
  bad = []
  for path in sorted((ROOT / "_src").rglob("*.py")):
    for line, target in _imports(path):
      top = target.split(".")[0]
      if top not in allowed and top not in stdlib:
        bad.append(f"{path.name}:{line} imports {target}")
  assert not bad, "; ".join(bad)


def test_modules_stay_small():
  big = {
    str(p.relative_to(ROOT.parent)): n
    for p in MODULES
    if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
  }
  assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"
