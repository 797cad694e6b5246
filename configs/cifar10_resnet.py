"""CIFAR-10 ResNet-(6n+2) (default 20), usually started from the shipped PyTorch checkpoint.

Reproduce the imported accuracy (81.03% on the JPEG test split), then
post-training compression, in a few minutes:

    python train.py --config=configs/cifar10_resnet.py --workdir=/tmp/r20 \
        --config.init_from=../shared/models/resnet20-cifar10.npz \
        --config.dense_epochs=0 --config.prune_epochs=0 --config.quant_epochs_per_step=0

The fair reference for a compressed run fine-tunes the float model for the
same number of steps: add --config.reference_only=true (see
benchmarks/bench_cifar_resnet.sh).
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model.name = "cifar_resnet"
  c.model.depth = 20
  c.dataset.name = "cifar10"
  c.dataset.augment = True
  c.batch_size = 128
  c.eval_batch_size = 1000

  # From scratch (He et al. 2016 schedule, cosine instead of steps); with
  # init_from, set dense_epochs=0.
  c.dense_epochs = 160.0
  c.learning_rate = 0.1
  c.lr_schedule = "cosine"
  c.weight_decay = 1e-4

  c.prune.method = "dns"
  c.prune.sparsity = 0.7
  c.prune_epochs = 10.0
  c.prune.learning_rate = 0.01

  c.quant.bits = 5
  c.quant_epochs_per_step = 2.0
  c.quant.final_epochs = 6.0
  c.quant.learning_rate = 1e-3
  c.quant.lr_decay_epochs = 3.0
  c.checkpoint_every_steps = 200
  return c
