"""Every key a run understands, with neutral defaults; the other configs start here.

docs/pipeline.md explains each key, stage by stage. Override any key on the
command line: `--config.prune.sparsity=0.8`. A stage's length is given in
epochs or in steps, one of the two (`--config.prune.steps=100` on the command
line replaces the file's `prune.epochs`; setting both in one place is an
error). Epochs are floats (0.25 = a quarter of the training batches). Keys
marked "contract" are the stable interface.
"""

import ml_collections
from ml_collections import config_dict


def _schedule(section, *, learning_rate, lr_schedule: str, decay_epochs=0.0, factor=0.1) -> None:
  section.learning_rate = learning_rate
  section.lr_schedule = lr_schedule  # cosine | step | constant, over the stage
  section.lr_decay_epochs = decay_epochs  # step schedule: period in epochs
  section.lr_decay_factor = factor  # step schedule: multiplier


def get_config() -> ml_collections.ConfigDict:
  """The base configuration (digits CNN on scikit-learn digits)."""
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  # digits_cnn, cifar_resnet, resnet18, resnet50, mobilenet_v1, mobilenet_v2
  c.model.name = "digits_cnn"
  c.model.depth = config_dict.placeholder(int)  # contract; cifar_resnet: 6n+2 (None: 20/init_from)
  c.model.dtype = "float32"  # computation dtype; parameters stay float32
  # BatchNorm training statistics (ImageNet models): "global" over the whole (global)
  # batch, "per_device" over each device's shard (data-parallel PyTorch without SyncBN).
  c.model.batch_norm_axis = "global"

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "digits"  # digits, cifar10, imagenet2012
  c.dataset.data_dir = ""  # cifar10: folder of cifar10-jpeg.tar.gz; imagenet: tfds data_dir
  c.dataset.augment = False  # cifar10: random crop + flip
  c.dataset.image_size = 224  # imagenet only
  c.dataset.resize_size = 256  # imagenet only: eval resize of the shorter side
  c.dataset.train_split = "train"  # imagenet only
  c.dataset.eval_split = "validation"  # imagenet only
  c.dataset.num_workers = 0  # imagenet only: grain decoding processes (0: in this process)

  # contract: weights to start from ("" = random init from seed): a flat Flax .npz, or
  # PyTorch weights for the importers (CIFAR ResNet .npz; torchvision resnet18/resnet50/
  # mobilenet_v2 .pth or .npz of state-dict keys; docs/imagenet.md)
  c.init_from = ""
  c.seed = 0  # contract: init, data order, augmentation and FQ sampling
  c.batch_size = 64  # contract: global batch (split over all devices)
  # When set, replaces batch_size by this times the device count (resolved at start).
  c.per_device_batch_size = config_dict.placeholder(int)
  c.eval_batch_size = 500
  c.steps_per_epoch = -1  # cap on training batches per epoch (-1: the whole split)
  c.eval_steps = -1  # cap on test batches per evaluation (-1: the whole split)

  # SGD + momentum with L2 weight decay on kernels, shared by every stage.
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.momentum = 0.9  # contract
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 5e-4  # contract

  # Dense training (after init_from, if any).
  c.dense = ml_collections.ConfigDict()
  c.dense.epochs = config_dict.placeholder(float)  # contract (or dense.steps)
  c.dense.epochs = 30.0
  c.dense.steps = config_dict.placeholder(int)
  _schedule(c.dense, learning_rate=0.1, lr_schedule="cosine")  # contract: dense.learning_rate

  # Pruning: DNS fine-tuning, one-shot magnitude masks + fine-tuning, or none.
  c.prune = ml_collections.ConfigDict()
  c.prune.method = "dns"  # contract: dns | magnitude | none
  c.prune.sparsity = config_dict.placeholder(float)  # contract: target in [0, 1), or
  c.prune.sparsity = 0.9
  c.prune.sensitivity = config_dict.placeholder(float)  # DNS's a: t = mean|W| + a*std|W|
  c.prune.scope = "layer"  # layer: each layer at its target; global: one threshold, total exact
  c.prune.update_every = 1  # dns: updates between mask updates
  c.prune.epochs = config_dict.placeholder(float)  # contract (or prune.steps)
  c.prune.epochs = 10.0
  c.prune.steps = config_dict.placeholder(int)
  _schedule(c.prune, learning_rate=config_dict.placeholder(float), lr_schedule="cosine")
  # Per-layer pruning rules "REGEX:key=value,..." with keys prune, sparsity, sensitivity,
  # min_ndim.
  c.prune.rules = ()
  # dns: sparsity rises from 0 to the target over this fraction of the stage
  # (Zhu & Gupta 2017 cubic ramp); 0: the target from the first step.
  c.prune.ramp_fraction = 0.0

  # Focused quantization with the INQ schedule.
  c.quant = ml_collections.ConfigDict()
  c.quant.enabled = True
  c.quant.bits = 5  # contract: 2..8
  c.quant.w_sep = 2.0  # contract: Wasserstein separation threshold (Eq. 4)
  c.quant.inq_fractions = (0.25, 0.5, 0.75, 0.875, 1.0)  # (1.0,): all at once, then final length
  c.quant.inq_order = "magnitude"  # magnitude (INQ) | error (smallest quantization error first)
  c.quant.epochs_per_step = config_dict.placeholder(float)  # contract; 0: post-training
  c.quant.epochs_per_step = 2.0
  c.quant.steps_per_step = config_dict.placeholder(int)
  c.quant.final_epochs = config_dict.placeholder(float)  # None (and final_steps None): 10/3 x
  c.quant.final_steps = config_dict.placeholder(int)
  c.quant.refit_every_epochs = config_dict.placeholder(float)  # None: one INQ step; 0: never
  c.quant.refit_every_steps = config_dict.placeholder(int)
  c.quant.refit_growth = 2.0  # each re-estimation interval is this times the previous
  # learning_rate None: dense.learning_rate; paper: decay every 3 epochs, factor OPEN.
  _schedule(
    c.quant,
    learning_rate=config_dict.placeholder(float),
    lr_schedule="step",
    decay_epochs=3.0,
    factor=0.5,
  )
  c.quant.lr_restart = True  # every INQ step starts again at quant.learning_rate
  c.quant.alpha_learning_rate = 1e-4  # Adam on the per-layer scales alpha (0 freezes them)
  c.quant.gmm_iters = 200
  # Integer inference (docs/integer_inference.md): power-of-two-scaled integer
  # activations at every conv/dense input (trained straight-through in the
  # quantize stage) and the integer batch norm with sigma and alpha folded in,
  # simulated in evaluation and recorded in model.fqz for `fq-jax evaluate --integer`.
  c.quant.activation_bits = 0  # 0: float activations; else 2..16 (paper's Table 3: 8)
  c.quant.bn_bits = 0  # 0: float batch norm; else 2..24 (paper's Table 3: 16)
  c.quant.activation_calibration_batches = 8  # training batches that calibrate the scales
  c.quant.activation_percentile = 99.99  # clip of each layer input: this percentile of |x|
  # Per-layer quantization rules "REGEX:key=value,..." with keys quantize, bits,
  # w_sep, recentralize, min_ndim.
  c.quant.rules = ()

  # Distillation from the model as it stood before pruning (frozen teacher) in
  # the prune and quantize stages: (1 - w) CE + w T^2 KL(teacher || student).
  c.distill = ml_collections.ConfigDict()
  c.distill.weight = 0.0  # w in [0, 1]; 0: off
  c.distill.temperature = 4.0  # T > 0

  c.reference_only = False  # fine-tune the float model instead of compressing (fair reference)

  c.encode = ml_collections.ConfigDict()
  c.encode.enabled = True  # write model.fqz
  c.encode.coder = "ans"  # ans | huffman

  c.checkpoint_every_steps = 0  # 0: only at stage ends
  c.max_checkpoints = 2
  c.async_checkpointing = True
  # Test-split evaluation every this many epochs inside each stage, for the
  # accuracy curve in metrics.csv (0: only at stage ends; costs one pass over the test split).
  c.eval_every_epochs = 0
  c.log_every = 20  # steps between log lines (or progress-bar updates): loss, images/s, ETA
  c.tensorboard = True  # event files next to metrics.csv (first process)
  c.progress_bar = True
  return c
