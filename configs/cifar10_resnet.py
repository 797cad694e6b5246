"""CIFAR-10 ResNet-(6n+2) (default 20), usually started from the shipped PyTorch checkpoint.

The default schedule is sized for a 2-core CPU (1,443 steps of batch 128, about
3.7 epochs after the import: 1.5 epochs of DNS, INQ 25/50/75/87.5/100% 0.4 epochs
each with re-estimation, 0.6 final epochs; BENCHMARKS.md has its measured time
and result).
`configs/cifar10_resnet_long.py` keeps the longer schedule for accelerators.

    python train.py --config=configs/cifar10_resnet.py --workdir=/tmp/r20 \\
        --config.init_from=../shared/models/resnet20-cifar10.npz --config.dense.epochs=0

The fair reference fine-tunes the float model for the same number of steps:
add --config.reference_only=true (benchmarks/bench_cifar_resnet.sh runs both).
The imported model's own accuracy (81.03% on the JPEG test split):

    fq-jax evaluate ../shared/models/resnet20-cifar10.npz --model cifar_resnet \\
        --depth 20 --dataset cifar10 --data-dir ../shared/data
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
  c.prune.epochs = 1.5
  c.prune.learning_rate = 0.01

  c.quant.bits = 5
  c.quant.epochs_per_step = 0.4
  c.quant.final_epochs = 0.6
  c.quant.learning_rate = 1e-3
  c.quant.lr_decay_epochs = 3.0
  c.checkpoint_every_steps = 200
  c.eval_every_epochs = 1  # the accuracy curve of BENCHMARKS.md
  return c
