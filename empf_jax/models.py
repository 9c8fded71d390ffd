"""EM-PF networks as Flax NNX modules and the :func:`create` factory (docs/model.md §3).

Every network runs the consecutive time steps ``t0 .. t0+S-1`` of time-major input ``[S, B, ...]``
with :meth:`SpikingNetwork.run`; :meth:`SpikingNetwork.step` is one step with an explicit state
(online training) and ``__call__`` all T steps from the zero state (evaluation, BPTT).
The residual stream of the ResNets carries currents; neurons sit before each block's convolutions.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from empf_jax import ops
from empf_jax.layers import (
  LATENT_INIT_MAX,
  SECA,
  Dense,
  EMPFNeuron,
  LIFNeuron,
  ParallelNeuron,
  QConv,
  StepBatchNorm,
)

NEURONS = ("empf", "lif")
WEIGHTS = ("binary", "ternary", "float")
STEMS = ("cifar", "imagenet", "tiny", "event")
SPIKE_BITS = (None, 4)
SECA_VARIANTS = (0, 1, 2)


SET_FROM_DATA = ("num_classes", "time_steps", "in_channels", "in_features")
"""The options a training program sets from the data and ``config.time_steps``, not from the
model section of its config."""


class ConfigError(ValueError):
  """An unknown network, option or a combination of options the spec does not allow."""


def _allowed(key: str, value: Any, allowed: Sequence[Any]) -> None:
  """Raises unless ``value`` is one of ``allowed``; a bool never stands for an int or back."""
  if not any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed):
    raise ConfigError(
      f"{key}={value!r} is not allowed; allowed: " + ", ".join(repr(a) for a in allowed)
    )


def is_integer(value: Any) -> bool:
  """Python or NumPy integer, not a bool (the check of every integer option)."""
  return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
  """Finite Python or NumPy real number, not a bool (the check of every real option)."""
  return (
    isinstance(value, numbers.Real)
    and not isinstance(value, (bool, np.bool_))
    and math.isfinite(value)
  )


@dataclasses.dataclass(frozen=True)
class NetOptions:
  """What a network is: its name and every option of :func:`create` (docs/model.md §3).

  Frozen and checked on construction: an unknown network, a value out of range or a combination
  that docs/model.md §3 does not allow raises :class:`ConfigError` naming the option and what is
  allowed. ``None`` is the one sentinel: ``stem=None`` and ``in_channels=None`` stand for the
  network's default and are resolved here (an instance holds the stem and channel count the
  network is built with), ``spike_bits=None`` means floating-point spikes and
  ``in_features=None`` that the network does without it (every network but ``mlp``).

  This class is the one description of the options: the training configs' ``config.model``
  holds every field but those the program sets from the data (:data:`SET_FROM_DATA`), with the
  defaults below, and their checks are the checks here. A new option is a new field whose
  default builds the network as it was before the option existed (runs saved without it then
  resume unchanged).

  Attributes:
    name: one of :data:`NETWORKS`: ``resnet18``, ``resnet19``, ``resnet34``, ``vgg11``,
      ``vgg13``, ``vgg_snn``, ``convnet_small``, ``convnet28`` (28x28 inputs: 32
      full-precision channels, pool, 64 and 128 binary channels at 14x14 and 7x7, the 7x7 maps
      flattened into the classifier), ``mlp``.
    num_classes: classifier outputs.
    time_steps: T; every neuron layer has T decay and T threshold scalars.
    in_channels: input channels; default 2 for the event stem, else 3 (1 is common for
      convnet_small on grey images).
    in_features: input values per example and time step (H * W * C); ``mlp`` only, which
      needs it; the other networks ignore it.
    stem: ``cifar`` (3x3), ``imagenet`` (7x7/2 + maxpool), ``tiny`` (3x3 + maxpool) or
      ``event`` (3x3 on 2 polarity channels); default ``event`` for vgg_snn, ``dense`` (its
      full-precision first layer, the only choice) for mlp, else ``cifar``.
    neuron: ``empf`` (the EM-PF family) or ``lif`` (baseline).
    weights: ``binary`` (1 bit), ``ternary`` (1.5 bit) or ``float`` for the block convolutions.
    mem_bn: Mem-BN in every EM-PF neuron with state (EM-PF only).
    parallel: stateless second neuron in every basic block (ResNets, EM-PF only).
    spike_bits: None (floating-point spikes) or 4 (EM-PF only).
    seca: 0 (none), 1 (SECA-I) or 2 (SECA-II, ResNets only).
    learnable_lif: train the LIF decay and threshold (LIF only).
    width: channel multiplier (tests build e.g. width=1/8 networks).
    symmetric_init: latent binary/ternary weights uniform in [-latent_init, latent_init)
      instead of [0, latent_init) (beyond the method, docs/model.md §7).
    step_stats: every conv BatchNorm keeps separate running averages per time step and
      evaluates step t with its own (beyond the method, which shares them, docs/model.md §7;
      meant for inputs whose distribution changes with t, such as row chunks of sequential
      Fashion-MNIST).
    latent_init: largest magnitude of the initial binary/ternary latent weights (default 1e-3,
      the authors' initialisation; other values are beyond the method, docs/model.md §7).
  """

  name: str
  num_classes: int
  time_steps: int
  in_channels: int | None = None
  in_features: int | None = None
  stem: str | None = None
  neuron: str = "empf"
  weights: str = "binary"
  mem_bn: bool = False
  parallel: bool = False
  spike_bits: int | None = None
  seca: int = 0
  learnable_lif: bool = False
  width: float = 1.0
  symmetric_init: bool = False
  step_stats: bool = False
  latent_init: float = LATENT_INIT_MAX

  def __post_init__(self):
    _allowed("name", self.name, NETWORKS)
    _allowed("neuron", self.neuron, NEURONS)
    _allowed("weights", self.weights, WEIGHTS)
    if not any(self.spike_bits == a and not isinstance(self.spike_bits, bool) for a in SPIKE_BITS):
      raise ConfigError(
        f"spike_bits={self.spike_bits!r} is not allowed; allowed: None, 4 "
        "(None: floating-point spikes)"
      )
    _allowed("seca", self.seca, SECA_VARIANTS)
    for key in ("num_classes", "time_steps"):
      value = getattr(self, key)
      if not is_integer(value) or value < 1:
        raise ConfigError(f"{key}={value!r} is not allowed; allowed: an integer >= 1")
    if self.in_channels is not None and (not is_integer(self.in_channels) or self.in_channels < 1):
      raise ConfigError(
        f"in_channels={self.in_channels!r} is not allowed; allowed: an integer >= 1"
      )
    if (self.name == "mlp" or self.in_features is not None) and (
      not is_integer(self.in_features) or self.in_features < 1
    ):
      raise ConfigError(
        f"in_features={self.in_features!r} is not allowed"
        f"{' with ' + repr(self.name) if self.in_features is None else ''}; "
        "allowed: an integer >= 1 (the number of input values per example and "
        "time step)"
      )
    if not is_real(self.width) or not self.width > 0:
      raise ConfigError(f"width={self.width!r} is not allowed; allowed: a number > 0")
    if not is_real(self.latent_init) or not 0 < self.latent_init <= 1:
      raise ConfigError(
        f"latent_init={self.latent_init!r} is not allowed; allowed: a number in (0, 1]"
      )
    stem = self.stem if self.stem is not None else NETWORK_STEMS[self.name][0]
    _allowed(f"stem (for {self.name})", stem, NETWORK_STEMS[self.name])
    for key in ("mem_bn", "parallel", "learnable_lif", "step_stats", "symmetric_init"):
      _allowed(key, getattr(self, key), (False, True))
    if self.parallel and self.name not in RESNETS:
      raise ConfigError(
        f"parallel=True is not allowed with {self.name!r}; allowed only in: " + ", ".join(RESNETS)
      )
    if self.seca == 2 and self.name not in RESNETS:
      raise ConfigError(
        f"seca=2 is not allowed with {self.name!r}; allowed: 0, 1 (SECA-II only "
        "in " + ", ".join(RESNETS) + ")"
      )
    if self.neuron != "empf":
      for key, off in (("mem_bn", False), ("parallel", False), ("spike_bits", None)):
        if getattr(self, key) != off:
          raise ConfigError(
            f"{key}={getattr(self, key)!r} is not allowed with "
            f"neuron={self.neuron!r}; allowed: {off!r} (only the EM-PF neuron "
            "has it)"
          )
    elif self.learnable_lif:
      raise ConfigError(
        "learnable_lif=True is not allowed with neuron='empf'; allowed: False "
        "(it selects the learnable LIF baseline)"
      )
    in_channels = (2 if stem == "event" else 3) if self.in_channels is None else self.in_channels
    resolved = {
      "stem": stem,
      "in_channels": int(in_channels),
      "in_features": None if self.in_features is None else int(self.in_features),
      "num_classes": int(self.num_classes),
      "time_steps": int(self.time_steps),
      "width": float(self.width),
      "latent_init": float(self.latent_init),
    }
    for key, value in resolved.items():
      object.__setattr__(self, key, value)

  @classmethod
  def of(cls, name: str, **options: Any) -> NetOptions:
    """``NetOptions(name, **options)``, raising :class:`ConfigError` (not TypeError) for an
    unknown or a missing option."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    allowed = [key for key in fields if key != "name"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
      raise ConfigError(f"unknown create() option(s) {unknown}; allowed: {allowed}")
    missing = [
      key for key in allowed if key not in options and fields[key].default is dataclasses.MISSING
    ]
    if missing:
      raise ConfigError(f"create() option(s) {missing} are required")
    return cls(name, **options)

  def create_options(self) -> dict[str, Any]:
    """Every option but the name, as keyword arguments of :func:`create`."""
    options = dataclasses.asdict(self)
    del options["name"]
    return options

  def norm(self, features: int) -> StepBatchNorm:
    """A conv BatchNorm: shared running averages, or one set per time step (``step_stats``)."""
    return StepBatchNorm(features, self.time_steps if self.step_stats else None)

  def channels(self, base: int) -> int:
    """Channel count scaled by the width multiplier (at least 1)."""
    return max(1, int(round(base * self.width)))

  def neuron_layer(self, features: int, *, parallel: bool = False, mem_bn: bool | None = None):
    """A neuron module of this network's kind (EM-PF family or LIF)."""
    if self.neuron == "lif":
      return LIFNeuron(self.time_steps, learnable=self.learnable_lif)
    if parallel:
      return ParallelNeuron(self.time_steps, spike_bits=self.spike_bits)
    return EMPFNeuron(
      self.time_steps,
      features,
      mem_bn=self.mem_bn if mem_bn is None else mem_bn,
      spike_bits=self.spike_bits,
    )

  def conv(
    self,
    cin: int,
    cout: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: int | None = None,
    weights: str | None = None,
    rngs: nnx.Rngs,
  ) -> QConv:
    """A convolution with this network's weights (or ``weights``) and latent initialisation."""
    return QConv(
      cin,
      cout,
      kernel,
      stride=stride,
      padding=padding,
      weights=weights or self.weights,
      symmetric_init=self.symmetric_init,
      latent_init=self.latent_init,
      rngs=rngs,
    )


class SpikingNetwork(nnx.Module):
  """Base class: the three ways of running a network share :meth:`run`.

  Attributes:
    options: the :class:`NetOptions` the network was built from (:func:`create`); the classes
      below are its building blocks, which tests also assemble into smaller networks.
  """

  options: NetOptions

  @property
  def time_steps(self) -> int:
    return self.options.time_steps

  def run(
    self, x: jax.Array, state: Any, t0: jax.Array | int, *, train: bool, online: bool = True
  ) -> tuple[jax.Array, Any]:
    """Runs steps t0..t0+S-1 of time-major input x [S, B, ...]; returns logits [S, B, K] and state.

    ``state=None`` starts from the zero state. ``online=False`` keeps the gradient through the
    membrane (BPTT). ``train`` selects batch statistics (and updates the running averages).
    """
    raise TypeError(f"{type(self).__name__} must define run()")

  def step(
    self, x_t: jax.Array, state: Any, t: jax.Array | int, *, train: bool, online: bool = True
  ) -> tuple[jax.Array, Any]:
    """One time step: input [B, ...] at step t with the carried state -> (logits [B, K], state)."""
    logits, state = self.run(x_t[None], state, t, train=train, online=online)
    return logits[0], state

  def __call__(self, x: jax.Array, *, train: bool = False, online: bool = True) -> jax.Array:
    """All T steps from the zero state: time-major input [T, B, ...] -> logits [T, B, K]."""
    logits, _ = self.run(x, None, 0, train=train, online=online)
    return logits

  def init_state(self, x_t: jax.Array) -> Any:
    """The zero neuron state for a batch of one step's input ``x_t`` [B, ...]."""
    graphdef, variables = nnx.split(self)

    def shapes(x):
      model = nnx.merge(graphdef, variables)
      return model.run(x[None], None, 0, train=False)[1]

    abstract = jax.eval_shape(shapes, x_t)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)


class Stem(nnx.Module):
  """Full-precision first convolution + BN (+ max pooling for the ImageNet and Tiny stems)."""

  def __init__(
    self, kind: str, in_channels: int, out_channels: int, opts: NetOptions, *, rngs: nnx.Rngs
  ):
    self.kind = kind
    if kind == "imagenet":
      self.conv = QConv(
        in_channels, out_channels, 7, stride=2, padding=3, weights="float", rngs=rngs
      )
    else:
      self.conv = QConv(in_channels, out_channels, 3, weights="float", rngs=rngs)
    self.bn = opts.norm(out_channels)

  def __call__(self, x: jax.Array, t0: jax.Array | int, *, train: bool) -> jax.Array:
    y = self.bn(self.conv(x), t0, train=train)
    if self.kind in ("imagenet", "tiny"):
      y = ops.fold_time(y, ops.max_pool)
    return y


class BasicBlock(nnx.Module):
  """Pre-activation spiking basic block (neuron before each conv; the stream carries currents).

  Forward, and with SECA-II (in == out channels)::

    out = SECA1(BN(conv1(act1(x))));  out = SECA2(BN(conv2(act2(out)))) + shortcut(x)
    out = SECA1(x + BN(conv1(act1(x))));  out = SECA2(out + BN(conv2(act2(out)))) + shortcut(x)
  """

  def __init__(self, cin: int, cout: int, stride: int, opts: NetOptions, *, rngs: nnx.Rngs):
    self.seca_variant = opts.seca if not (opts.seca == 2 and cin != cout) else 1
    self.act1 = opts.neuron_layer(cin)
    self.conv1 = opts.conv(cin, cout, 3, stride=stride, rngs=rngs)
    self.bn1 = opts.norm(cout)
    self.act2 = opts.neuron_layer(cout, parallel=opts.parallel)
    self.conv2 = opts.conv(cout, cout, 3, rngs=rngs)
    self.bn2 = opts.norm(cout)
    self.seca1 = SECA(rngs=rngs) if opts.seca else None
    self.seca2 = SECA(rngs=rngs) if opts.seca else None
    downsample = stride != 1 or cin != cout  # a 1x1 convolution + BN where the shape changes
    self.shortcut_conv = (
      opts.conv(cin, cout, 1, stride=stride, padding=0, rngs=rngs) if downsample else None
    )
    self.shortcut_bn = opts.norm(cout) if downsample else None

  def _attend(self, seca: SECA | None, residual: jax.Array, y: jax.Array) -> jax.Array:
    if seca is None:
      return y
    if self.seca_variant == 2:
      return seca(residual + y)
    return seca(y)

  def __call__(self, x, state, t0, *, train: bool, online: bool):
    state1, state2 = state if state is not None else (None, None)
    spikes, state1 = self.act1(x, state1, t0, train=train, online=online)
    out = self._attend(self.seca1, x, self.bn1(self.conv1(spikes), t0, train=train))
    spikes, state2 = self.act2(out, state2, t0, train=train, online=online)
    y = self._attend(self.seca2, out, self.bn2(self.conv2(spikes), t0, train=train))
    if self.shortcut_conv is None or self.shortcut_bn is None:
      shortcut = x
    else:
      shortcut = self.shortcut_bn(self.shortcut_conv(x), t0, train=train)
    return y + shortcut, (state1, state2)


class ResNet(SpikingNetwork):
  """Spiking ResNet-18/34 (and the ResNet-19 layout).

  h = stem(x) = [maxpool](BN(conv(x)));  h = block_k(h) for every basic block (currents);
  logits = FC(GAP(h)),  or for ResNet-19  logits = FC(EM-PF(FC_hidden(GAP(h)))).
  """

  def __init__(
    self,
    blocks: Sequence[int],
    widths: Sequence[int],
    strides: Sequence[int],
    opts: NetOptions,
    *,
    stem_width: int = 64,
    hidden: int | None = None,
    rngs: nnx.Rngs,
  ):
    self.options = opts
    num_classes = opts.num_classes
    width = opts.channels(stem_width)
    assert opts.stem is not None and opts.in_channels is not None  # resolved by NetOptions
    self.stem = Stem(opts.stem, opts.in_channels, width, opts, rngs=rngs)
    layers = []
    cin = width
    for count, base, stride in zip(blocks, widths, strides):
      cout = opts.channels(base)
      for i in range(count):
        layers.append(BasicBlock(cin, cout, stride if i == 0 else 1, opts, rngs=rngs))
        cin = cout
    self.blocks = nnx.List(layers)
    if hidden is None:
      self.fc_hidden = None
      self.head_neuron = None
      self.fc = Dense(cin, num_classes, rngs=rngs)
    else:
      self.fc_hidden = Dense(cin, hidden, rngs=rngs)
      self.head_neuron = opts.neuron_layer(hidden, parallel=False, mem_bn=False)
      self.fc = Dense(hidden, num_classes, rngs=rngs)

  def run(self, x, state, t0, *, train, online=True):
    if state is None:
      state = {"blocks": [None] * len(self.blocks), "head": None}
    h = self.stem(x, t0, train=train)
    block_states = []
    for block, block_state in zip(self.blocks, state["blocks"]):
      h, block_state = block(h, block_state, t0, train=train, online=online)
      block_states.append(block_state)
    h = ops.spatial_mean(h)
    head_state = None
    if self.fc_hidden is not None:
      h, head_state = self.head_neuron(
        self.fc_hidden(h), state["head"], t0, train=train, online=online
      )
    return self.fc(h), {"blocks": block_states, "head": head_state}


class ConvUnit(nnx.Module):
  """conv3x3 -> BN -> (SECA) -> neuron, the unit of the VGG networks and convnet_small."""

  def __init__(
    self,
    cin: int,
    cout: int,
    opts: NetOptions,
    *,
    weights: str | None = None,
    kernel_size: int = 3,
    rngs: nnx.Rngs,
  ):
    self.conv = opts.conv(cin, cout, kernel_size, weights=weights, rngs=rngs)
    self.bn = opts.norm(cout)
    self.seca = SECA(rngs=rngs) if opts.seca else None
    self.neuron = opts.neuron_layer(cout)

  def __call__(self, x, state, t0, *, train: bool, online: bool):
    y = self.bn(self.conv(x), t0, train=train)
    if self.seca is not None:
      y = self.seca(y)
    return self.neuron(y, state, t0, train=train, online=online)


class Plain(SpikingNetwork):
  """A chain of conv units with average pooling ('M'), then GAP ('G') or flatten, then FC."""

  def __init__(
    self,
    plan: Sequence[int | str],
    opts: NetOptions,
    *,
    first_weights: str | None,
    flatten_to: int | None = None,
    rngs: nnx.Rngs,
  ):
    """``first_weights``: the first convolution's weights (None: the network's)."""
    self.options = opts
    self.plan = tuple(plan)
    units = []
    assert opts.in_channels is not None  # resolved by NetOptions
    cin = opts.in_channels
    for i, item in enumerate(plan):
      if isinstance(item, str):
        continue
      cout = opts.channels(item)
      units.append(ConvUnit(cin, cout, opts, weights=first_weights if i == 0 else None, rngs=rngs))
      cin = cout
    self.units = nnx.List(units)
    self.flatten = flatten_to is not None
    self.flatten_to = flatten_to
    features = cin * flatten_to * flatten_to if flatten_to is not None else cin
    self.fc = Dense(features, opts.num_classes, rngs=rngs)

  def run(self, x, state, t0, *, train, online=True):
    if state is None:
      state = [None] * len(self.units)
    states = []
    units = iter(zip(self.units, state))
    h = x
    for item in self.plan:
      if item == "M":
        h = ops.avg_pool(h, 2)
      elif item == "G":
        h = ops.spatial_mean(h)
      else:
        unit, unit_state = next(units)
        h, unit_state = unit(h, unit_state, t0, train=train, online=online)
        states.append(unit_state)
    if h.ndim > 3:
      if self.flatten and h.shape[2:4] != (self.flatten_to, self.flatten_to):
        raise ValueError(
          f"input of shape {tuple(x.shape)} reaches the classifier as {h.shape[2]}x"
          f"{h.shape[3]} maps; this network flattens {self.flatten_to}x{self.flatten_to} maps "
          f"(inputs of {self.flatten_to * self.input_stride}x"
          f"{self.flatten_to * self.input_stride} pixels)"
        )
      h = h.reshape(h.shape[:2] + (-1,)) if self.flatten else ops.spatial_mean(h)
    return self.fc(h), states

  @property
  def input_stride(self) -> int:
    """Input pixels per classifier-map pixel along one side (2 per pooling)."""
    return 2 ** sum(1 for item in self.plan if item == "M")


class ConvNetSmall(SpikingNetwork):
  """Small EM-PF conv net for digits and Fashion-MNIST.

  stem conv3x3 (float) c_in->W + BN; neuron; conv3x3 W->2W + BN; neuron; avgpool 2;
  conv3x3 2W->2W + BN; neuron; GAP; FC.  W = 32 * width.
  """

  def __init__(self, opts: NetOptions, *, rngs: nnx.Rngs):
    self.options = opts
    w = opts.channels(32)
    assert opts.in_channels is not None  # resolved by NetOptions
    self.unit1 = ConvUnit(opts.in_channels, w, opts, weights="float", rngs=rngs)
    self.unit2 = ConvUnit(w, 2 * w, opts, rngs=rngs)
    self.unit3 = ConvUnit(2 * w, 2 * w, opts, rngs=rngs)
    self.fc = Dense(2 * w, opts.num_classes, rngs=rngs)

  def run(self, x, state, t0, *, train, online=True):
    state = state if state is not None else (None, None, None)
    h, s1 = self.unit1(x, state[0], t0, train=train, online=online)
    h, s2 = self.unit2(h, state[1], t0, train=train, online=online)
    h = ops.avg_pool(h, 2)
    h, s3 = self.unit3(h, state[2], t0, train=train, online=online)
    return self.fc(ops.spatial_mean(h)), (s1, s2, s3)


class MLP(SpikingNetwork):
  """Fully connected EM-PF network for sequences of small inputs (sequential Fashion-MNIST).

  Per step: x_t flattened to F values;  h1 = neuron(BN(W1 x_t)) with W1 F->H in full precision;
  h2 = neuron(BN(W2 h1)) with W2 H->H binary (or the network's weights);  logits = FC(h2);
  H = 256 * width. The two layers are 1x1 convolutions on a 1x1 map, so binarisation (one
  scale per output unit), BatchNorm, SECA, deployment and accounting are those of the conv
  layers.
  """

  def __init__(self, opts: NetOptions, *, rngs: nnx.Rngs):
    self.options = opts
    assert opts.in_features is not None  # checked by NetOptions
    self.in_features = opts.in_features
    hidden = opts.channels(256)
    self.unit1 = ConvUnit(opts.in_features, hidden, opts, weights="float", kernel_size=1, rngs=rngs)
    self.unit2 = ConvUnit(hidden, hidden, opts, kernel_size=1, rngs=rngs)
    self.fc = Dense(hidden, opts.num_classes, rngs=rngs)

  def run(self, x, state, t0, *, train, online=True):
    features = math.prod(x.shape[2:])
    if features != self.in_features:
      raise ValueError(
        f"input of shape {tuple(x.shape)} has {features} values per example and "
        f"step; this mlp was built for in_features={self.in_features}"
      )
    state = state if state is not None else (None, None)
    h = x.reshape(x.shape[:2] + (1, 1, features))
    h, s1 = self.unit1(h, state[0], t0, train=train, online=online)
    h, s2 = self.unit2(h, state[1], t0, train=train, online=online)
    return self.fc(h[:, :, 0, 0, :]), (s1, s2)


VGG11_PLAN = (64, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
VGG13_PLAN = (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, 512, "M", 512, "G")
# 28x28 inputs: pool right after the full-precision first unit, two binary units at 14x14 and
# 7x7, and the 7x7 maps flattened into the classifier (docs/model.md §3).
CONVNET28_PLAN = (32, "M", 64, "M", 128)

RESNETS = ("resnet18", "resnet19", "resnet34")
NETWORKS = RESNETS + ("vgg11", "vgg13", "vgg_snn", "convnet_small", "convnet28", "mlp")
NETWORK_STEMS = {
  "resnet18": STEMS,
  "resnet34": STEMS,
  "resnet19": ("cifar", "event"),
  "vgg11": ("cifar",),
  "vgg13": ("cifar",),
  "vgg_snn": ("event",),
  "convnet_small": ("cifar",),
  "convnet28": ("cifar",),
  "mlp": ("dense",),
}


def create(
  options: NetOptions | str, /, *, rngs: nnx.Rngs | None = None, **kwargs: Any
) -> SpikingNetwork:
  """Builds one of the networks of docs/model.md §3.

  Args:
    options: the network (:class:`NetOptions`), or its name with the other options as keyword
      arguments: ``create("resnet18", num_classes=10, time_steps=4)`` is
      ``create(NetOptions("resnet18", num_classes=10, time_steps=4))``.
    rngs: parameter RNG; default ``nnx.Rngs(0)``.
    **kwargs: the options of :class:`NetOptions` but the name, when ``options`` is a name.

  Returns:
    The network; its ``options`` are the :class:`NetOptions` it was built from. Raises
    :class:`ConfigError` naming the bad option and what is allowed.
  """
  if isinstance(options, str):
    options = NetOptions.of(options, **kwargs)
  elif kwargs:
    raise TypeError(
      f"create() takes NetOptions or a name with keyword options, not both (got {sorted(kwargs)})"
    )
  return _BUILDERS[options.name](options, rngs if rngs is not None else nnx.Rngs(0))


def _resnet(blocks: Sequence[int], widths: Sequence[int], strides: Sequence[int]):
  return lambda opts, rngs: ResNet(blocks, widths, strides, opts, rngs=rngs)


def _resnet19(opts: NetOptions, rngs: nnx.Rngs) -> ResNet:
  first_stride = 2 if opts.stem == "event" else 1
  return ResNet(
    (3, 3, 2), (128, 256, 512), (first_stride, 2, 2), opts, hidden=opts.channels(256), rngs=rngs
  )


def _plain(plan: Sequence[int | str], **kwargs: Any):
  return lambda opts, rngs: Plain(plan, opts, rngs=rngs, **kwargs)


# How each of NETWORKS is built from its options.
_BUILDERS = {
  "resnet18": _resnet((2, 2, 2, 2), (64, 128, 256, 512), (1, 2, 2, 2)),
  "resnet34": _resnet((3, 4, 6, 3), (64, 128, 256, 512), (1, 2, 2, 2)),
  "resnet19": _resnet19,
  "vgg11": _plain(VGG11_PLAN, first_weights="float"),
  "vgg13": _plain(VGG13_PLAN, first_weights="float"),
  "vgg_snn": _plain(VGG11_PLAN, first_weights=None, flatten_to=3),
  "convnet28": _plain(CONVNET28_PLAN, first_weights="float", flatten_to=7),
  "convnet_small": lambda opts, rngs: ConvNetSmall(opts, rngs=rngs),
  "mlp": lambda opts, rngs: MLP(opts, rngs=rngs),
}
