"""Training and evaluation steps as pure functions (docs/model.md §4).

Three training rules share one model and one state:

* ``online`` (default): for t = 1..T, forward step t with the carried, stopped neuron state, loss_t
  = CE_ls(f_t(x), y), gradient, one optimizer update. T updates per batch; a ``lax.scan`` over t
  carries parameters, optimizer state, BatchNorm statistics and neuron state, so memory does not
  grow with T.
* ``random_step``: draw t* uniformly in 1..T from the run's seed folded with the global step; run
  steps t < t* forward only (statistics and state, no gradient) in a loop with a dynamic bound; one
  update at t*; nothing after t* is computed.
* ``bptt``: loss CE_ls(sum_t f_t(x), y) with gradients through time (no stop-gradient), one update.

The model is split once into a static ``graphdef`` and array state; the step functions take and
return a :class:`TrainState` so that callers can ``jax.jit`` them with shardings and donation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from empf_jax import layers, quantize
from empf_jax.layers import set_recording
from empf_jax.models import SpikingNetwork

MODES = ("online", "random_step", "bptt")
LABEL_SMOOTHING = 0.1


class TrainState(NamedTuple):
  """Everything that changes during training.

  Attributes:
    params: trainable parameters (``nnx.Param`` state).
    rest: the other model state: BatchNorm running averages, fixed neuron scalars.
    opt_state: optimizer state (learning rate injected as a hyperparameter).
    step: number of mini-batches trained so far (int32 scalar).
  """

  params: Any
  rest: Any
  opt_state: Any
  step: jax.Array


class StepOutput(NamedTuple):
  """Per-batch training metrics (means over the batch; ``loss`` averaged over the updates).

  ``code_change`` and ``update_ratio`` map every binary/ternary kernel (path name) to the mean over
  the batch's updates of :func:`code_change_fraction` and of ||W_new - W_old|| / ||W_old|| for its
  latent weights (:func:`weight_changes`).
  """

  loss: jax.Array
  accuracy: jax.Array
  time_step: jax.Array
  code_change: dict = {}  # noqa: RUF012 (a NamedTuple's default, never mutated)
  update_ratio: dict = {}  # noqa: RUF012


def weight_codes(w: jax.Array, kind: str) -> jax.Array:
  """The discrete code a latent kernel stands for: sign(W) in {-1, +1} (sign(0) = +1) for
  ``binary``, the ternary codes in {-1, 0, +1} (:func:`~empf_jax.quantize.ternary_codes`) for
  ``ternary``."""
  if kind == "binary":
    return quantize.binary_sign(w)
  if kind == "ternary":
    return quantize.ternary_codes(w)[0]
  raise ValueError(f"kind={kind!r} is not allowed; allowed: 'binary', 'ternary'")


def code_change_fraction(old: jax.Array, new: jax.Array, kind: str) -> jax.Array:
  """Fraction of the weights of a binary/ternary kernel whose code differs between two latent
  kernels ``old`` and ``new`` (binary: sign flips; ternary: any change among -1, 0, +1)."""
  return jnp.mean((weight_codes(old, kind) != weight_codes(new, kind)).astype(jnp.float32))


_QUANTIZED_KINDS = {layers.BinaryWeight: "binary", layers.TernaryWeight: "ternary"}


def quantized_kernels(params: Any) -> dict[str, tuple[str, jax.Array]]:
  """{path name: (kind, latent kernel)} of every binary/ternary kernel in a parameter state."""
  out = {}
  for path, variable in nnx.to_flat_state(params):
    kind = _QUANTIZED_KINDS.get(type(variable))
    if kind is not None:
      out["/".join(map(str, path[:-1]))] = (kind, variable.get_value())
  return out


def weight_changes(old_params: Any, new_params: Any) -> tuple[dict, dict]:
  """Per binary/ternary kernel: the fraction of codes one update changed, and the update's size
  relative to the latent weights, ||W_new - W_old|| / ||W_old||."""
  old, new = quantized_kernels(old_params), quantized_kernels(new_params)
  changes, ratios = {}, {}
  for name, (kind, w_old) in old.items():
    w_new = new[name][1]
    changes[name] = code_change_fraction(w_old, w_new, kind)
    ratios[name] = jnp.linalg.norm((w_new - w_old).ravel()) / jnp.maximum(
      jnp.linalg.norm(w_old.ravel()), 1e-30
    )
  return changes, ratios


def latent_magnitudes(
  params: Any, quantiles: tuple[float, ...] = (0.01, 0.1, 0.5, 0.9, 0.99)
) -> dict[str, dict[str, float]]:
  """Distribution of abs(W) of every binary/ternary latent kernel: the given quantiles (keys
  ``p1``, ``p10``, ...), the mean, and the fraction of weights that STE clipping freezes
  (abs(W) > 1)."""
  out = {}
  for name, (_, w) in quantized_kernels(params).items():
    magnitude = jnp.abs(jnp.asarray(w, jnp.float32)).ravel()
    values = jnp.quantile(magnitude, jnp.asarray(quantiles))
    entry = {f"p{round(100 * q):g}": float(v) for q, v in zip(quantiles, values)}
    entry["mean"] = float(jnp.mean(magnitude))
    entry["clipped"] = float(jnp.mean(magnitude > 1.0))
    out[name] = entry
  return out


def _not_latent(params: Any) -> Any:
  """True for every parameter except binary/ternary latent kernels (a mask for weight decay)."""
  return jax.tree.map(
    lambda v: not isinstance(v, (layers.BinaryWeight, layers.TernaryWeight)),
    params,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )


def make_optimizer(
  *,
  momentum: float = 0.9,
  weight_decay: float = 5e-4,
  nesterov: bool = True,
  learning_rate: float = 0.01,
  decay_latent: bool = True,
) -> optax.GradientTransformation:
  """SGD with Nesterov momentum and coupled L2: g <- g + wd * w, then momentum, then -lr.

  The learning rate is an injected hyperparameter so the caller sets it per epoch
  (:func:`set_learning_rate`), independent of how many updates a batch makes.
  ``decay_latent=False`` leaves the binary/ternary latent kernels out of the weight decay.
  """

  def sgd(learning_rate):
    return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=None if decay_latent else _not_latent),
      optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    )

  return optax.inject_hyperparams(sgd)(learning_rate=learning_rate)


def set_learning_rate(opt_state: Any, learning_rate: jax.Array | float) -> Any:
  """Returns ``opt_state`` of an ``inject_hyperparams`` optimizer with a new learning rate."""
  hyper = dict(opt_state.hyperparams)
  hyper["learning_rate"] = jnp.asarray(
    learning_rate, dtype=jnp.asarray(opt_state.hyperparams["learning_rate"]).dtype
  )
  return opt_state._replace(hyperparams=hyper)


def epoch_learning_rate(
  epoch: int | jax.Array,
  *,
  base: float = 0.01,
  epochs: int = 300,
  warmup_epochs: int = 5,
  warmup_start: float = 0.01,
) -> jax.Array:
  """Learning rate of an epoch (0-based): linear warm-up, then cosine to 0. ::

    lr(e) = base * (w0 + (1 - w0) e / E_w)                  for e < E_w
    lr(e) = base * (1 + cos(pi (e - E_w) / (E - E_w))) / 2  otherwise

  An ``optax`` schedule evaluated at the epoch index (not at the update count), so the rate does
  not depend on how many updates a batch makes.
  """
  # On the unit scale, then times base: optax's linear schedule computes
  # (w0 - 1)(1 - e / E_w) + 1, which loses digits when its end value is large against w0.
  unit = optax.join_schedules(
    [
      optax.linear_schedule(warmup_start, 1.0, max(warmup_epochs, 1)),
      optax.cosine_decay_schedule(1.0, max(epochs - warmup_epochs, 1)),
    ],
    boundaries=[warmup_epochs],
  )
  return base * unit(jnp.asarray(epoch, jnp.int32))


def create_train_state(
  model: SpikingNetwork, optimizer: optax.GradientTransformation
) -> tuple[nnx.GraphDef, TrainState]:
  """Splits ``model`` into its static graph and a :class:`TrainState`."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]
  return graphdef, TrainState(params, rest, optimizer.init(params), jnp.zeros((), jnp.int32))


def fresh_merge(graphdef: nnx.GraphDef, *states: Any) -> nnx.Module:
  """``nnx.merge`` on fresh Variable objects, so that the model may update its statistics inside
  a transformation (grad, scan body) entered after ``states`` were made."""
  return nnx.merge(graphdef, *jax.tree.map(lambda leaf: leaf, states))


def merge(graphdef: nnx.GraphDef, state: TrainState) -> SpikingNetwork:
  """The model with the parameters and statistics of ``state``."""
  model = fresh_merge(graphdef, state.params, state.rest)
  assert isinstance(model, SpikingNetwork)
  return model


def time_major(x: jax.Array, time_steps: int, *, static: bool) -> jax.Array:
  """Network input [T, B, ...]: a static batch [B, ...] repeated T times (direct encoding), or a
  batch of sequences [B, T, ...] moved to time-major."""
  if static:
    return jnp.broadcast_to(x[None], (time_steps,) + x.shape)
  return jnp.swapaxes(x, 0, 1)


def smoothed_targets(
  labels: jax.Array, num_classes: int, label_smoothing: float = LABEL_SMOOTHING
) -> jax.Array:
  """Label-smoothed target distribution from integer labels [B] or soft targets [B, K]."""
  onehot = labels if labels.ndim == 2 else jax.nn.one_hot(labels, num_classes)
  return onehot * (1.0 - label_smoothing) + label_smoothing / num_classes


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean cross-entropy of logits [B, K] against target distributions [B, K] (computed in f32)."""
  return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))


def mix_batch(
  key: jax.Array,
  x: jax.Array,
  onehot: jax.Array,
  *,
  mixup_alpha: float = 0.8,
  cutmix_alpha: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
  """Mixup (Beta(0.8, 0.8)) or CutMix (Beta(1, 1)), one of the two with probability 1/2 each.

  Mixup: x = lam x + (1 - lam) x[perm]; CutMix pastes a box of area fraction (1 - lam) from
  x[perm]; in both the targets mix with the realised lam. ``x`` is [B, H, W, C] (or
  [B, T, H, W, C]).
  """
  k_choice, k_mix, k_cut, k_perm, k_box = jax.random.split(key, 5)
  perm = jax.random.permutation(k_perm, x.shape[0])
  use_cutmix = jax.random.bernoulli(k_choice)
  lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha)
  lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha)
  height, width = x.shape[-3], x.shape[-2]
  ratio = jnp.sqrt(1.0 - lam_cut)
  cut_h, cut_w = (ratio * height).astype(jnp.int32), (ratio * width).astype(jnp.int32)
  cy = jax.random.randint(k_box, (), 0, height)
  cx = jax.random.randint(jax.random.fold_in(k_box, 1), (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  box = ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1))[..., None]
  lam_box = 1.0 - jnp.sum(box) / (height * width)
  cut = jnp.where(box, x[perm], x)
  mixed = lam_mix * x + (1.0 - lam_mix) * x[perm]
  lam = jnp.where(use_cutmix, lam_box, lam_mix)
  x_out = jnp.where(use_cutmix, cut, mixed).astype(x.dtype)
  return x_out, lam * onehot + (1.0 - lam) * onehot[perm]


class StepConfig(NamedTuple):
  """Static settings of a training step (hashable, so jitted steps specialise on them)."""

  mode: str = "online"
  time_steps: int = 4
  num_classes: int = 10
  static_input: bool = True
  label_smoothing: float = LABEL_SMOOTHING
  mix: bool = False
  compute_dtype: Any = jnp.float32
  # Unroll of the online rule's time scan. Rolled (1) keeps the compiled step's memory flat in T;
  # on CPU it also trained faster than fully unrolled (benchmarks/memory.py, throughput.py).
  time_unroll: bool | int = 1


def _batch_key(seed_key: jax.Array, step: jax.Array, purpose: int) -> jax.Array:
  """The random key of one batch and one purpose: the run's key folded with the global step, so
  every process draws the same values."""
  return jax.random.fold_in(jax.random.fold_in(seed_key, step), purpose)


_KEY_TIME_STEP = 0
_KEY_MIX = 1


def draw_time_step(seed_key: jax.Array, step: jax.Array, time_steps: int) -> jax.Array:
  """t* (0-based) of random single-step training for global step ``step``: uniform in [0, T)."""
  return jax.random.randint(_batch_key(seed_key, step, _KEY_TIME_STEP), (), 0, time_steps)


def step_schedule(
  mode: str, time_steps: int, step: jax.Array, seed_key: jax.Array
) -> tuple[Any, tuple[Any, ...]]:
  """Which time steps one batch runs and which of them end with an update, for the rules that
  update step by step: (S, updated), the batch running steps 0 .. S-1 forward.

  ``online``: S = T, an update after every step. ``random_step``: S = t* + 1 with
  t* = :func:`draw_time_step` (``seed_key``, ``step``), one update, after step t*; the steps
  before it run forward only. Works on traced and concrete values: :func:`make_train_step`'s
  random-step rule takes t* from it (its online rule is a scan over all T steps), and the
  step-by-step replay that looks for a non-finite value follows it for both rules.
  """
  if mode == "random_step":
    t_star = draw_time_step(seed_key, step, time_steps)
    return t_star + 1, (t_star,)
  if mode == "online":
    return time_steps, tuple(range(time_steps))
  raise ValueError(f"mode={mode!r} has no step schedule; allowed: online, random_step")


def prepare_batch(
  config: StepConfig, x: jax.Array, labels: jax.Array, step: jax.Array, seed_key: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """The time-major input [T, B, ...] and the smoothed targets [B, K] of one training batch.

  ``x`` is cast to the compute dtype; with ``config.mix`` the batch is mixed (:func:`mix_batch`)
  with a key drawn from the run's key and the global ``step``, so every process mixes alike.
  """
  x = x.astype(config.compute_dtype)
  targets = jax.nn.one_hot(labels, config.num_classes)
  if config.mix:
    x, targets = mix_batch(_batch_key(seed_key, step, _KEY_MIX), x, targets)
  targets = smoothed_targets(targets, config.num_classes, config.label_smoothing)
  return time_major(x, config.time_steps, static=config.static_input), targets


def sequence_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """BPTT's loss: the cross-entropy of the summed outputs sum_t f_t(x), logits [T, B, K]."""
  return cross_entropy(jnp.sum(logits.astype(jnp.float32), axis=0), targets)


def apply_update(
  optimizer: optax.GradientTransformation, params: Any, opt_state: Any, grads: Any
) -> tuple[Any, Any]:
  """One optimizer update: (new parameters, new optimizer state)."""
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def make_train_step(
  graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, config: StepConfig
) -> Callable:
  """Builds ``train_step(state, x, labels, learning_rate, seed_key) -> (state, StepOutput)``.

  ``x`` is [B, H, W, C] for static images (fed at every step) or [B, T, ...] for sequences;
  ``labels`` are int [B]. The function is pure; jit it (with shardings and donation) at the call
  site.
  """
  if config.mode not in MODES:
    raise ValueError(f"mode={config.mode!r} is not allowed; allowed: {', '.join(MODES)}")
  steps = config.time_steps

  def step_loss(params, rest, neuron_state, x_t, t, targets, online=True):
    model = fresh_merge(graphdef, params, rest)
    logits, neuron_state = model.step(x_t, neuron_state, t, train=True, online=online)
    rest = nnx.state(model, nnx.Not(nnx.Param))
    return cross_entropy(logits, targets), (logits, neuron_state, rest)

  grad_fn = jax.value_and_grad(step_loss, has_aux=True)

  def update(params, opt_state, grads):
    return apply_update(optimizer, params, opt_state, grads)

  def online(state, x_seq, targets, labels, lr, seed_key):
    neuron_state = merge(graphdef, state).init_state(x_seq[0])
    opt_state = set_learning_rate(state.opt_state, lr)

    def body(carry, inputs):
      params, rest, opt_state, neuron_state = carry
      x_t, t = inputs
      (loss, (logits, neuron_state, rest)), grads = grad_fn(
        params, rest, neuron_state, x_t, t, targets
      )
      new_params, opt_state = update(params, opt_state, grads)
      changes = weight_changes(params, new_params)
      correct = jnp.mean(jnp.argmax(logits, -1) == labels)
      return (new_params, rest, opt_state, neuron_state), (loss, correct, changes)

    (params, rest, opt_state, _), (losses, correct, changes) = jax.lax.scan(
      body,
      (state.params, state.rest, opt_state, neuron_state),
      (x_seq, jnp.arange(steps)),
      unroll=config.time_unroll,
    )
    code_change, update_ratio = jax.tree.map(lambda v: jnp.mean(v, 0), changes)
    return (
      TrainState(params, rest, opt_state, state.step + 1),
      StepOutput(
        jnp.mean(losses), correct[-1], jnp.asarray(steps, jnp.int32), code_change, update_ratio
      ),
    )

  def random_step(state, x_seq, targets, labels, lr, seed_key):
    _, (t_star,) = step_schedule("random_step", steps, state.step, seed_key)
    neuron_state = merge(graphdef, state).init_state(x_seq[0])

    def prefix(t, carry):
      rest, neuron_state = carry
      model = fresh_merge(graphdef, state.params, rest)
      _, neuron_state = model.step(x_seq[t], neuron_state, t, train=True)
      return nnx.state(model, nnx.Not(nnx.Param)), neuron_state

    rest, neuron_state = jax.lax.fori_loop(0, t_star, prefix, (state.rest, neuron_state))
    (loss, (logits, _, rest)), grads = grad_fn(
      state.params, rest, neuron_state, x_seq[t_star], t_star, targets
    )
    params, opt_state = update(state.params, set_learning_rate(state.opt_state, lr), grads)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return (
      TrainState(params, rest, opt_state, state.step + 1),
      StepOutput(loss, accuracy, t_star + 1, *weight_changes(state.params, params)),
    )

  def bptt(state, x_seq, targets, labels, lr, seed_key):
    def loss_fn(params):
      model = fresh_merge(graphdef, params, state.rest)
      logits = model(x_seq, train=True, online=False)
      return sequence_loss(logits, targets), (logits, nnx.state(model, nnx.Not(nnx.Param)))

    (loss, (logits, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    params, opt_state = update(state.params, set_learning_rate(state.opt_state, lr), grads)
    accuracy = jnp.mean(jnp.argmax(jnp.sum(logits.astype(jnp.float32), axis=0), -1) == labels)
    return (
      TrainState(params, rest, opt_state, state.step + 1),
      StepOutput(
        loss, accuracy, jnp.asarray(steps, jnp.int32), *weight_changes(state.params, params)
      ),
    )

  rule = {"online": online, "random_step": random_step, "bptt": bptt}[config.mode]

  def train_step(
    state: TrainState,
    x: jax.Array,
    labels: jax.Array,
    learning_rate: jax.Array,
    seed_key: jax.Array,
  ) -> tuple[TrainState, StepOutput]:
    x_seq, targets = prepare_batch(config, x, labels, state.step, seed_key)
    return rule(state, x_seq, targets, labels, learning_rate, seed_key)

  return train_step


def reset_batch_stats(graphdef: nnx.GraphDef, state: TrainState) -> TrainState:
  """``state`` with every BatchNorm running average back at its initial value (mean 0, var 1)."""
  model = merge(graphdef, state)
  for path, variable in nnx.iter_graph(model):
    if isinstance(variable, nnx.BatchStat):
      fill = jnp.zeros_like if path[-1] == "mean" else jnp.ones_like
      variable[...] = fill(variable[...])
  return state._replace(rest=nnx.state(model, nnx.Not(nnx.Param)))


def make_recalibrate_step(graphdef: nnx.GraphDef, config: StepConfig) -> Callable:
  """Builds ``recalibrate_step(state, x) -> state``: one forward pass over all T steps in training
  mode with the parameters frozen, so only the BatchNorm running averages move (each step's
  statistics enter them once, in step order, as in training).

  Re-estimating the running averages this way after :func:`reset_batch_stats` (BN
  re-estimation, an option beyond the method, docs/model.md §7) makes them depend on the final
  weights only. It
  matters for binary weights trained online: the running averages mix statistics taken between
  the T updates of every batch, and latent weights near zero flip sign from one update to the
  next, so those averages can describe no single set of weights.
  """
  steps = config.time_steps

  def recalibrate_step(state: TrainState, x: jax.Array) -> TrainState:
    model = merge(graphdef, state)
    model(time_major(x.astype(config.compute_dtype), steps, static=config.static_input), train=True)
    return state._replace(rest=nnx.state(model, nnx.Not(nnx.Param)))

  return recalibrate_step


class EvalOutput(NamedTuple):
  """Sums over one evaluation batch (divide by ``count`` for means).

  Attributes:
    correct: [T] correct predictions at each step (prediction at t = argmax sum_{tau<=t} f_tau).
    loss: summed cross-entropy of the mean output over T.
    count: number of (unmasked) examples.
    spikes: {layer: non-zero spike count}; ``elements``: {layer: spike count capacity}.
  """

  correct: jax.Array
  loss: jax.Array
  count: jax.Array  # type: ignore[assignment]  # the field shadows tuple.count
  spikes: dict
  elements: dict


def neuron_layers(model: nnx.Module) -> dict[str, layers.Neuron]:
  """The neuron modules of ``model`` by path name, in forward order."""
  return {
    "/".join(map(str, path)): module
    for path, module in nnx.iter_graph(model)
    if isinstance(module, layers.Neuron)
  }


def learned_neuron_scalars(model: nnx.Module) -> dict[str, dict[str, list[float]]]:
  """Decay lambda_t and threshold theta_t (theta'_t for LIF) of every neuron layer and step."""
  out = {}
  for name, neuron in neuron_layers(model).items():
    theta = jax.nn.sigmoid(neuron.b[...])
    entry = {"threshold": theta}
    if isinstance(neuron, layers.LIFNeuron):
      entry["threshold"] = theta + 0.5
    if hasattr(neuron, "a"):
      entry["decay"] = jax.nn.sigmoid(neuron.a[...])
    out[name] = {k: [float(v) for v in jax.device_get(val)] for k, val in entry.items()}
  return out


def make_eval_step(graphdef: nnx.GraphDef, config: StepConfig) -> Callable:
  """Builds ``eval_step(state, x, labels, mask) -> EvalOutput`` (all T steps at once, eval mode).

  ``mask`` [B] is 1 for real examples and 0 for padding, so every test example counts once.
  """
  steps = config.time_steps

  def eval_step(state: TrainState, x: jax.Array, labels: jax.Array, mask: jax.Array) -> EvalOutput:
    model = merge(graphdef, state)
    set_recording(model, True)
    x_seq = time_major(x.astype(config.compute_dtype), steps, static=config.static_input)
    logits, recorded = nnx.capture(lambda net, inputs: net(inputs, train=False), nnx.Intermediate)(
      model, x_seq
    )
    logits = logits.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    cumulative = jnp.cumsum(logits, axis=0)
    correct = jnp.sum((jnp.argmax(cumulative, -1) == labels[None]) * mask[None], axis=1)
    per_example = optax.softmax_cross_entropy_with_integer_labels(
      jnp.mean(logits, 0), jnp.maximum(labels, 0)
    )
    spikes: dict[str, jax.Array] = {}
    elements: dict[str, jax.Array] = {}
    for path, variable in nnx.to_flat_state(recorded):
      if path[-1] != "spikes":
        continue
      name = "/".join(map(str, path[:-1]))
      for spike in variable.get_value():
        spike_mask = mask.reshape((1, -1) + (1,) * (spike.ndim - 2))
        spikes[name] = spikes.get(name, 0.0) + jnp.sum((spike != 0) * spike_mask)
        elements[name] = elements.get(name, 0.0) + jnp.sum(
          jnp.broadcast_to(spike_mask, spike.shape)
        )
    return EvalOutput(correct, jnp.sum(per_example * mask), jnp.sum(mask), spikes, elements)

  return eval_step
