"""The README's main job: a digits CNN compressed > 40x in about a minute on 2 CPU cores.

    python train.py                       # = --config=configs/digits.py --workdir=workdir/digits

30 dense epochs from scratch, 10 epochs of DNS pruning, then 5-bit focused
quantization with INQ steps of 2 epochs and a final step of 6. The large
layers (conv2, fc1) carry almost all weights and are pruned hardest; the
first convolution and the classifier are tiny, so pruning them less costs a
few bytes and keeps the accuracy.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.batch_size = 64
  c.optimizer.weight_decay = 5e-4
  c.dense.epochs = 30.0
  c.dense.learning_rate = 0.05
  c.prune.epochs = 10.0
  c.prune.method = "dns"
  c.prune.sparsity = 0.96  # conv2 (18k weights)
  c.prune.learning_rate = 0.02
  c.quant.epochs_per_step = 2.0
  c.quant.final_epochs = 6.0
  c.quant.learning_rate = 0.005
  c.quant.bits = 5
  c.prune.rules = (
    "conv1/kernel$:sparsity=0.5",  # 288 weights
    "head/kernel$:sparsity=0.7",  # 480 weights
    "fc1/kernel$:sparsity=0.975",  # 49k weights, 71% of the model
  )
  c.checkpoint_every_steps = 100
  return c
