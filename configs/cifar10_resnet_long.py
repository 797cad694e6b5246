"""CIFAR-10 ResNet: the longer schedule for an accelerator (benchmarks/gpu_cifar.sh).

10 epochs of DNS, INQ 25/50/75/87.5/100% two epochs each, 6 final epochs (28
epochs after the import); everything else as configs/cifar10_resnet.py.
"""

from configs import cifar10_resnet


def get_config():
  c = cifar10_resnet.get_config()
  c.prune.epochs = 10.0
  c.quant.epochs_per_step = 2.0
  c.quant.final_epochs = 6.0
  c.eval_every_epochs = 0
  return c
