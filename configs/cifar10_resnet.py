"""CIFAR-10 ResNet-(6n+2) (default 20), usually started from the shipped PyTorch checkpoint.

Post-training compression of the imported model (81.03% on the JPEG test
split, on the `dense:` line), in a few minutes:

    python train.py --config=configs/cifar10_resnet.py --workdir=/tmp/r20 \
        --config.init_from=../shared/models/resnet20-cifar10.npz \
        --config.dense.epochs=0 --config.prune.epochs=0 --config.quant.epochs_per_step=0

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
  # init_from, set dense.epochs=0.
  c.dense.epochs = 160.0
  c.dense.learning_rate = 0.1
  c.dense.lr_schedule = "cosine"
  c.optimizer.weight_decay = 1e-4

  c.prune.method = "dns"
  c.prune.sparsity = 0.7
  c.prune.epochs = 10.0
  c.prune.learning_rate = 0.01

  c.quant.bits = 5
  c.quant.epochs_per_step = 2.0
  c.quant.final_epochs = 6.0
  c.quant.learning_rate = 1e-3
  c.quant.lr_decay_epochs = 3.0
  c.checkpoint_every_steps = 200
  return c
