"""What every stage of a run needs: the validated config, model, data, mesh and rules.

`make_context` checks the whole config (and the workdir) before any work, so a
bad setting stops the run before the first step with a one-line `ConfigError`.
The evaluation helpers live here too: they need nothing but the context.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import fq_jax as fq
from fq_jax import models as models_lib
from fq_jax.models import torch_import
from fq_jax.pipeline import configuration as cfg
from fq_jax.pipeline import input_pipeline
from fq_jax.pipeline import sharding as sharding_lib
from fq_jax.pipeline import steps as steps_lib
from fq_jax.pipeline.configuration import ConfigError

Log = Callable[[str], None]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class Context:
  """What every stage needs; built once per run by `make_context`.

  Attributes:
    config: the validated config.
    workdir: output folder.
    model: the Flax model.
    model_name: its label ("digits_cnn", "cifar_resnet-20", ...).
    source: the dataset.
    mesh: the device mesh.
    rules: one exact `fq.Rule` per compressed parameter (`cfg.compression_rules`).
    init_variables: `init_from`'s variables, or None.
    log: where progress lines go.
    is_main: whether this host writes files.
  """

  config: Any
  workdir: str
  model: Any
  model_name: str
  source: input_pipeline.DataSource
  mesh: jax.sharding.Mesh
  rules: tuple[fq.Rule, ...]
  init_variables: dict[str, Any] | None
  log: Log
  is_main: bool
  _eval_step: Any = None
  _quantized: Any = None

  @property
  def top5(self) -> bool:
    return self.source.num_classes > 10

  @property
  def compress(self) -> bool:
    """False in reference mode: the later stages train the float model."""
    return not self.config.reference_only

  @property
  def prunes(self) -> bool:
    return self.compress and self.config.prune.method != "none"

  @property
  def quantizes(self) -> bool:
    return self.compress and self.config.quant.enabled

  @property
  def steps_per_epoch(self) -> int:
    return self.source.steps_per_epoch


def _load_init(config, model_name: str) -> tuple[int | None, dict[str, Any] | None]:
  """Reads `init_from`: (cifar depth or None, variables as numpy trees).

  Accepted: a flat Flax `.npz` ("params/conv1/kernel", ...) for any model; a
  PyTorch CIFAR ResNet state dict as `.npz` for cifar_resnet; a torchvision
  state dict (`.pth`/`.pt`, or its `.npz` of torch keys) for the torchvision
  architectures (`torch_import.TORCHVISION_ARCHS`).
  """
  path = config.init_from
  if not path:
    return config.model.depth, None
  if not path.endswith(".npz"):  # .pth / .pt: a torchvision state dict
    _check_torchvision(model_name, path)
    return config.model.depth, _import_torchvision(path, model_name)
  try:
    with np.load(path) as data:
      arrays = {k: data[k] for k in data.files}
  except (OSError, ValueError) as e:
    raise ConfigError("init_from", f"cannot read {path}: {e}") from None
  if not torch_import.is_torch_state(arrays):
    variables: dict[str, Any] = {}
    for key, value in arrays.items():
      node = variables
      *parents, leaf = key.split("/")
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = value
    return config.model.depth, variables
  if model_name in torch_import.TORCHVISION_ARCHS:
    return config.model.depth, _import_torchvision(arrays, model_name, path)
  if model_name != "cifar_resnet":
    _check_torchvision(model_name, path)  # raises: no importer for this model
  try:
    depth, variables = models_lib.import_torch_cifar_resnet(path)
  except ValueError as e:
    raise ConfigError("init_from", str(e).splitlines()[0]) from None
  if config.model.depth is not None and config.model.depth != depth:
    raise ConfigError("model.depth", f"{config.model.depth}, but {path} holds a ResNet-{depth}")
  return depth, variables


def _check_torchvision(model_name: str, path: str) -> None:
  if model_name not in torch_import.TORCHVISION_ARCHS:
    raise ConfigError(
      "init_from",
      f"{path} is a PyTorch state dict; {model_name} imports none (PyTorch weights are "
      f"imported for cifar_resnet (.npz) and {', '.join(torch_import.TORCHVISION_ARCHS)})",
    )


def _import_torchvision(source, model_name: str, path: str | None = None) -> dict[str, Any]:
  """torchvision weights (a file, or its already read torch keys) as Flax variables."""
  path = source if path is None else path
  try:
    if isinstance(source, str):
      source = torch_import.load_torch_state(source)
    return torch_import.torchvision_to_flax(source, model_name, source=path)
  except (ImportError, ValueError, OSError, RuntimeError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError("init_from", first if path in first else f"{path}: {first}") from None


def _check_structure(variables, abstract, path: str) -> None:
  want = jax.tree.map(lambda x: tuple(x.shape), abstract)
  got = jax.tree.map(lambda x: tuple(np.shape(x)), {k: variables.get(k, {}) for k in abstract})
  if want != got:
    raise ConfigError("init_from", f"{path} does not match the model's variables")


def build_model(config, num_classes: int, mesh: jax.sharding.Mesh, *, depth: int | None = None):
  """The run's Flax model: `model.name` at the computation dtype `model.dtype`.

  Parameters, optimizer state and batch statistics stay float32 whatever the dtype (the
  models keep `param_dtype` float32 and return float32 logits). With
  `model.batch_norm_axis` "per_device", BatchNorm statistics are those of each device's
  shard of the batch (`bn_groups` = the mesh's device count).

  Args:
    config: the validated config.
    num_classes: classifier size (the dataset's).
    mesh: the device mesh.
    depth: cifar_resnet's depth (None: 20).

  Returns:
    The unbound module.
  """
  name = config.model.name
  kwargs: dict[str, Any] = dict(num_classes=num_classes, dtype=_DTYPES[config.model.dtype])
  if name == "cifar_resnet":
    kwargs["depth"] = depth or 20
  if config.model.get("batch_norm_axis", "global") == "per_device" and mesh.devices.size > 1:
    kwargs["bn_groups"] = int(mesh.devices.size)
  return models_lib.get_model(name, **kwargs)


def make_context(config, workdir: str, *, mesh=None, log: Log = print) -> Context:
  """Validates the config and the workdir; builds the model, data source, mesh and rules.

  Raises:
    ConfigError: for a bad setting or workdir (one line naming the key).
  """
  cfg.validate(config)
  cfg.check_workdir(workdir)
  mesh = sharding_lib.make_mesh() if mesh is None else mesh
  if config.get("per_device_batch_size") is not None:
    # Learning rates derived from batch_size (configs/imagenet_common.py) follow it.
    config.batch_size = config.per_device_batch_size * mesh.devices.size
  for key in ("batch_size", "eval_batch_size"):
    try:
      sharding_lib.check_batch_size(config[key], mesh, key)
    except ValueError as e:
      raise ConfigError(key, str(e).split(": ", 1)[1]) from None
  source = input_pipeline.make_source(config)
  name = config.model.name
  depth, init_vars = _load_init(config, name)
  model = build_model(config, source.num_classes, mesh, depth=depth)
  ctx = Context(
    config=config,
    workdir=workdir,
    model=model,
    model_name=f"{name}-{model.depth}" if name == "cifar_resnet" else name,
    source=source,
    mesh=mesh,
    rules=(),
    init_variables=None,
    log=log,
    is_main=jax.process_index() == 0,
  )
  ctx.rules = cfg.compression_rules(config, abstract_variables(ctx)["params"])
  if init_vars is not None:
    _check_structure(init_vars, abstract_variables(ctx), config.init_from)
    ctx.init_variables = {k: init_vars[k] for k in ("params", "batch_stats") if k in init_vars}
  return ctx


def abstract_variables(ctx: Context) -> dict[str, Any]:
  """Shapes of {'params', 'batch_stats'} (no compute)."""
  x = jnp.zeros((1, *ctx.source.image_shape), jnp.float32)
  out = jax.eval_shape(lambda: ctx.model.init(jax.random.key(0), x, train=False))
  return {"params": out["params"], "batch_stats": out.get("batch_stats", {})}


def initial_variables(ctx: Context) -> dict[str, Any]:
  """`init_from`'s variables, or a fresh initialisation from the seed."""
  if ctx.init_variables is not None:
    v = ctx.init_variables
    return {"params": v["params"], "batch_stats": v.get("batch_stats", {})}
  x = jnp.zeros((1, *ctx.source.image_shape), jnp.float32)
  # The key is an argument, not a constant of the jitted function: with a constant key XLA
  # constant-folds the initializers' random numbers at compile time (minutes for ResNet-18).
  init = jax.jit(lambda key: ctx.model.init(key, x, train=False))
  out = init(jax.random.key(ctx.config.seed))
  return {"params": out["params"], "batch_stats": out.get("batch_stats", {})}


def requested_sparsity(ctx: Context) -> dict[str, float]:
  """{parameter path: the sparsity the rules ask for} for every compressed parameter."""
  specs = fq.resolve(
    abstract_variables(ctx)["params"], ctx.rules, sparsity=cfg.global_sparsity(ctx.config)
  )
  leaves = jax.tree.leaves(specs, is_leaf=lambda x: x is None)
  return {
    s.path: (s.sparsity if s.prune and ctx.prunes and s.sensitivity is None else 0.0)
    for s in leaves
    if s is not None
  }


def sparsity_report(ctx: Context, params, masks) -> dict[str, Any]:
  """`fq.sparsity_report` of the prune stage's masks, under the run's pruning settings."""
  p = ctx.config.prune
  return fq.sparsity_report(
    params,
    masks,
    sparsity=p.sparsity,
    sensitivity=p.sensitivity,
    rules=ctx.rules,
    scope=p.scope,
  )


# ----------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------


def forward_variables(ctx: Context, carry: dict[str, Any]) -> dict[str, Any]:
  """The variables inference uses: quantized parameters when there is an FQ state."""
  params = carry["params"]
  if carry.get("opt_state") is not None and ctx.quantizes:
    if ctx._quantized is None:
      ctx._quantized = jax.jit(fq.quantized)
    params = ctx._quantized(params, carry["opt_state"])
  out = {"params": params}
  if carry.get("batch_stats"):
    out["batch_stats"] = carry["batch_stats"]
  return out


def evaluate(ctx: Context, variables: dict[str, Any], model=None) -> dict[str, float]:
  """Test-split loss, top-1 (and top-5) accuracy of `variables` (with `model`, default ctx.model).

  The default model is evaluated in float32 even when it trains in bf16
  (`model.dtype`): the reported accuracies are those of the float32 network the
  `.fqz` holds, which `fq-jax evaluate` reproduces.
  """

  def jitted(m):
    step = steps_lib.make_eval_step(m, ctx.top5)
    return steps_lib.jit_eval_step(input_pipeline.normalizing(step), ctx.mesh)

  if ctx._eval_step is None:
    float32_model = ctx.model
    if getattr(ctx.model, "dtype", jnp.float32) != jnp.float32:
      float32_model = ctx.model.clone(dtype=jnp.float32)
    ctx._eval_step = jitted(float32_model)
  eval_step = ctx._eval_step if model is None else jitted(model)
  variables = sharding_lib.put_replicated(variables, ctx.mesh)
  bs = sharding_lib.batch_sharding(ctx.mesh)
  sums = None
  for batch in ctx.source.to_device(ctx.source.eval_batches(), bs):
    out = eval_step(variables, batch)
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = {k: float(steps_lib.host_value(v)) for k, v in sums.items()}
  n = max(sums["count"], 1.0)
  result = {"accuracy": sums["correct"] / n, "loss": sums["loss"] / n}
  if ctx.top5:
    result["top5"] = sums["correct5"] / n
  return result


def accuracy_fields(result: dict[str, float]) -> dict[str, float]:
  """The accuracy entries of an `evaluate` result (what the report keeps)."""
  return {k: result[k] for k in ("accuracy", "top5", "accuracy_float_activations") if k in result}


def to_host(tree):
  """numpy copies of (replicated, possibly multi-host) arrays; None leaves stay."""
  return jax.tree.map(steps_lib.host_value, tree)
