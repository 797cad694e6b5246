"""Shared ImageNet settings: tfds imagenet2012 and the paper's INQ schedule.

Paper (Sec. 3.5, 4): the quantized fraction grows 25/50/75/87.5/100%, 3
epochs per step at learning rate 1e-3 and 10 epochs for the final step, with
decay every 3 epochs (factor OPEN: 0.5 here; each INQ step restarts at 1e-3).
The data must be prepared for `tfds.data_source` (array_record) in
dataset.data_dir. No pretrained ImageNet weights ship with the project: pass
torchvision's `.pth` (ResNet-18/50, MobileNet-V2), a flat Flax `.npz` (keys
"params/..." and "batch_stats/...") as init_from with dense.epochs=0, or
train from scratch with the dense stage (docs/imagenet.md).

Compute: bfloat16 activations and convolutions (model.dtype), float32 parameters,
optimizer and FQ state, batch-norm statistics and logits; the quantizers and model.fqz
see only float32 values. model.dtype=float32 restores full precision.

Batch and learning rate: batch_size is the global batch, split over all devices (256:
He et al.'s, i.e. 256 per device on one device, 32 per device on 8). Setting
per_device_batch_size instead fixes the per-device batch: the global batch becomes
that times the device count when the run starts. Every stage's learning rate is given
per 256 images and scaled linearly with the global batch (Goyal et al. 2017): it is
computed from batch_size, so --config.batch_size=1024 (or a per-device batch on more
devices) raises dense.learning_rate from 0.1 to 0.4; a learning rate set on the
command line is taken as it is.
"""

from ml_collections import config_dict

from configs import default

BASE_BATCH = 256  # the batch the base learning rates below are given for


def scaled_lr(c, base: float):
  """`base` per 256 images, times batch_size / 256: a reference that follows batch_size."""
  return config_dict.FieldReference(float(base)) * c.get_ref("batch_size") / BASE_BATCH


def imagenet_config(model: str, *, sparsity: float, bits: int):
  """Base ImageNet config for `model` at the paper's sparsity and bit-width."""
  c = default.get_config()
  c.model.name = model
  c.model.dtype = "bfloat16"
  c.dataset.name = "imagenet2012"
  c.dataset.image_size = 224
  c.dataset.resize_size = 256
  c.dataset.num_workers = 16
  c.batch_size = BASE_BATCH
  c.eval_batch_size = 256

  # From scratch: 90 epochs, step decay x0.1 every 30 (He et al. 2016).
  c.dense.epochs = 90.0
  c.dense.learning_rate = scaled_lr(c, 0.1)
  c.dense.lr_schedule = "step"
  c.dense.lr_decay_epochs = 30.0
  c.dense.lr_decay_factor = 0.1
  c.optimizer.weight_decay = 1e-4

  # DNS to the paper's sparsity (per layer, prune.rules may override).
  c.prune.method = "dns"
  c.prune.sparsity = sparsity
  c.prune.epochs = 15.0
  c.prune.learning_rate = scaled_lr(c, 1e-3)
  c.prune.update_every = 10  # a per-layer sort every step is costly at this scale

  c.quant.bits = bits
  c.quant.epochs_per_step = 3.0
  c.quant.final_epochs = 10.0
  c.quant.learning_rate = scaled_lr(c, 1e-3)
  c.quant.lr_schedule = "step"
  c.quant.lr_decay_epochs = 3.0
  c.quant.lr_decay_factor = 0.5
  c.quant.lr_restart = True
  c.checkpoint_every_steps = 1000
  c.log_every = 50
  return c
