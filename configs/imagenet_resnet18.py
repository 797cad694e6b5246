"""ImageNet resnet18, 5-bit FQ at the paper's sparsity (74.86%); see configs/imagenet_common.py."""

from configs import imagenet_common


def get_config():
  c = imagenet_common.imagenet_config("resnet18", sparsity=0.7486, bits=5)
  return c
