"""Defaults shared by every configuration (SPEC section 4)."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """The paper's training setup: ResNet-18, T=4, binary weights, online rule, SGD 0.01, 300 epochs."""
  c = ml_collections.ConfigDict()
  c.dataset = "cifar10"
  c.data_dir = ""  # empty: the dataset's default location
  c.augment = True  # the dataset's training augmentation (random crop + flip for CIFAR)

  c.model = ml_collections.ConfigDict()
  c.model.name = "resnet18"
  c.model.stem = ""  # empty: the network's default stem
  c.model.neuron = "empf"
  c.model.weights = "binary"
  c.model.mem_bn = False
  c.model.parallel = False
  c.model.spike_bits = 0  # 0: floating-point spikes; 4: 4-bit spike compression
  c.model.seca = 0
  c.model.learnable_lif = False
  c.model.width = 1.0
  c.model.step_stats = False  # True: per-time-step BatchNorm running averages (beyond the SPEC)

  c.mode = "online"  # online | random_step | bptt
  c.time_steps = 4
  c.batch_size = 64
  c.epochs = 300
  c.learning_rate = 0.01
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 5e-4
  c.warmup_epochs = 5
  c.warmup_start = 0.01
  c.label_smoothing = 0.1
  c.mix = False  # mixup (alpha 0.8) or cutmix (alpha 1.0), one of them per batch
  c.compute_dtype = "float32"  # or bfloat16 (parameters stay float32)
  c.seed = 42
  # BN re-estimation (beyond the SPEC): at every epoch end (and with --eval_only) reset the
  # BatchNorm running averages and re-estimate them from this many training batches with the
  # weights frozen; 0 keeps the running averages of training.
  c.bn_recalibration_batches = 0

  # Harmless keys: they do not change the result and are left out of the config fingerprint.
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.log_every_steps = 50
  c.eval_every_epochs = 1
  c.progress = True
  return c
