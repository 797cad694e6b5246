"""ImageNet resnet50, 5-bit FQ at the paper's sparsity (82.70%); see configs/imagenet_common.py."""

from configs import imagenet_common


def get_config():
  c = imagenet_common.imagenet_config("resnet50", sparsity=0.827, bits=5)
  return c
