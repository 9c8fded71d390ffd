"""Defaults shared by every configuration (docs/model.md §4)."""

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
  """The paper's setup: ResNet-18, T=4, binary weights, online rule, SGD 0.01, 300 epochs."""
  c = ml_collections.ConfigDict()
  c.dataset = "cifar10"
  c.data_dir = ""  # empty: the dataset's default location
  c.augment = True  # the dataset's training augmentation (random crop + flip for CIFAR)

  c.model = ml_collections.ConfigDict()
  c.model.name = "resnet18"
  # None (as in empf_jax.models.NetOptions): the network's default stem; typed, so that
  # --config.model.stem=imagenet overrides it.
  c.model.stem = config_dict.placeholder(str)
  c.model.neuron = "empf"
  c.model.weights = "binary"
  c.model.mem_bn = False
  c.model.parallel = False
  c.model.spike_bits = config_dict.placeholder(int)  # None: floating-point spikes; 4: 4-bit
  c.model.seca = 0
  c.model.learnable_lif = False
  c.model.width = 1.0
  c.model.step_stats = False  # True: per-time-step BatchNorm running averages (docs/model.md §7)
  c.model.latent_init = 1e-3  # largest initial |latent weight| of binary/ternary kernels
  c.model.symmetric_init = False  # True: latent weights start in [-latent_init, latent_init)

  c.mode = "online"  # online | random_step | bptt
  c.time_steps = 4
  c.batch_size = 64
  c.epochs = 300
  c.learning_rate = 0.01
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 5e-4
  c.decay_latent_weights = True  # False: no weight decay on binary/ternary latent kernels
  c.warmup_epochs = 5
  c.warmup_start = 0.01
  c.label_smoothing = 0.1
  c.mix = False  # mixup (alpha 0.8) or cutmix (alpha 1.0), one of them per batch
  c.compute_dtype = "float32"  # or bfloat16 (parameters stay float32)
  c.seed = 42
  # BN re-estimation (beyond the paper): at every epoch end (and with --eval_only) reset the
  # BatchNorm running averages and re-estimate them from this many training batches with the
  # weights frozen, before the checkpoint; 0 keeps the running averages of training, which for
  # binary weights trained online fit no single set of weights (docs/model.md §7, BENCHMARKS.md).
  c.bn_recalibration_batches = 64

  # Harmless keys: they do not change the result and are left out of the config fingerprint.
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.log_every_steps = 50
  c.eval_every_epochs = 1
  c.progress = True
  # Worker processes making the input batches (grain); 0 or -1 (the default) for none: the
  # datasets decoded from files (ImageNet, Tiny-ImageNet) then decode on one thread per CPU core
  # of the training process (at most 32; faster than workers on 2 cores, BENCHMARKS.md §7), the
  # in-memory ones and the DVS frame cache make batches on one thread.
  c.input_workers = -1
  # At every evaluation also evaluate with BatchNorm averages re-estimated from this many
  # training batches (another order than the re-estimation above), beside the stored ones, and
  # write both to the metrics: the gap shows averages that do not fit the weights. 0: skip.
  c.bn_check_batches = 64
  return c
