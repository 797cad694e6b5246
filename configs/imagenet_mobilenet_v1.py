"""ImageNet mobilenet_v1, 7-bit FQ at the paper's sparsity (33.80%); see configs/imagenet_common.py."""

from configs import imagenet_common


def get_config():
  c = imagenet_common.imagenet_config("mobilenet_v1", sparsity=0.338, bits=7)
  c.optimizer.weight_decay = 4e-5
  # Depthwise convolutions are left unpruned (still quantized), as is common.
  c.prune.rules = ("dw_conv/kernel$:prune=false",)
  return c
