"""The training rules against hand computations, the schedule, mixing, evaluation and sharding."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from empf_jax import layers, models, testing, training

T = 3
BATCH = 8
CLASSES = 10
LR = 0.05


def tiny_model(seed=0, **options):
  model = models.create(
    "convnet_small",
    num_classes=CLASSES,
    time_steps=T,
    in_channels=1,
    width=1 / 8,
    rngs=nnx.Rngs(seed),
    **options,
  )
  testing.randomize(model, jax.random.key(seed + 100), scale=0.1)
  # Latent weights away from zero so that the binarised network has non-trivial gradients.
  for _, variable in nnx.iter_graph(model):
    if isinstance(variable, nnx.Param) and variable.ndim == 4:
      variable[...] = 0.3 * layers.draw(jax.random.normal, jax.random.key(7), variable.shape)
  return model


def batch(seed=1):
  kx, ky = jax.random.split(jax.random.key(seed))
  x = layers.draw(jax.random.normal, kx, (BATCH, 8, 8, 1))
  return x, jax.random.randint(ky, (BATCH,), 0, CLASSES)


def plain_sgd():
  return optax.inject_hyperparams(optax.sgd)(learning_rate=LR)


def step_loss(model, x, labels, state, t, online=True):
  logits, state = model.step(x, state, t, train=True, online=online)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, CLASSES), 0.1)
  return jnp.mean(optax.softmax_cross_entropy(logits, targets)), state


def run_rule(model, mode, x, labels, seed_key=None):
  opt = plain_sgd()
  graphdef, state = training.create_train_state(model, opt)
  step = training.make_train_step(
    graphdef, opt, training.StepConfig(mode=mode, time_steps=T, num_classes=CLASSES)
  )
  seed_key = jax.random.key(3) if seed_key is None else seed_key
  new_state, out = jax.jit(step)(state, x, labels, jnp.float32(LR), seed_key)
  return training.merge(graphdef, new_state), out


def assert_params_close(a, b, atol=1e-6):
  chex.assert_trees_all_close(
    nnx.state(a, nnx.Param), nnx.state(b, nnx.Param), atol=atol, rtol=1e-5
  )


def assert_stats_close(a, b):
  chex.assert_trees_all_close(
    nnx.state(a, nnx.BatchStat), nnx.state(b, nnx.BatchStat), atol=1e-6, rtol=1e-5
  )


def sgd_update(model, grads):
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda p, g: p - LR * g, params, grads))


@pytest.mark.parametrize(
  "options", [{}, pytest.param({"mem_bn": True, "spike_bits": 4}, marks=pytest.mark.slow)]
)
def test_online_is_T_hand_updates(options):
  """The online rule computed independently of the library's stop_gradient: each step's loss is
  differentiated with the previous state passed in as a constant (computed before the grad, so
  no gradient can flow into it) and the model's full-gradient path (online=False); then one SGD
  update per step."""
  x, labels = batch()
  trained, out = run_rule(tiny_model(**options), "online", x, labels)
  hand = tiny_model(**options)
  state = hand.init_state(x)
  for t in range(T):

    def loss_fn(model, state=state, t=t):
      return step_loss(model, x, labels, state, t, online=False)

    (_, state), grads = nnx.value_and_grad(loss_fn, has_aux=True)(hand)
    sgd_update(hand, grads)
  assert_params_close(trained, hand)
  assert_stats_close(trained, hand)
  # The last update's loss is included in the reported mean.
  assert int(out.time_step) == T


def test_the_hand_update_check_tells_T_updates_from_one_and_from_bptt():
  """The comparison of test_online_is_T_hand_updates fails for the two nearest wrong rules: one
  update (at the first step) and T updates whose gradients cross time (no stop_gradient)."""
  x, labels = batch()
  trained, _ = run_rule(tiny_model(), "online", x, labels)
  one = tiny_model()
  (_, _), grads = nnx.value_and_grad(
    lambda m: step_loss(m, x, labels, m.init_state(x), 0), has_aux=True
  )(one)
  sgd_update(one, grads)
  with pytest.raises(AssertionError):
    assert_params_close(trained, one)
  crossing = tiny_model()
  for t in range(T):

    def summed_to_t(model, t=t):
      state = model.init_state(x)
      for s in range(t):
        _, state = model.step(x, state, s, train=True, online=False)
      return step_loss(model, x, labels, state, t, online=False)

    (_, _), grads = nnx.value_and_grad(summed_to_t, has_aux=True)(crossing)
    sgd_update(crossing, grads)
  with pytest.raises(AssertionError):
    assert_params_close(trained, crossing)


def test_random_step_is_one_hand_update():
  x, labels = batch()
  seed_key = jax.random.key(11)
  trained, out = run_rule(tiny_model(), "random_step", x, labels, seed_key)
  t_star = int(training.draw_time_step(seed_key, jnp.int32(0), T))
  assert int(out.time_step) == t_star + 1
  hand = tiny_model()
  state = hand.init_state(x)
  for t in range(t_star):
    _, state = hand.step(x, state, t, train=True)
  (_, _), grads = nnx.value_and_grad(
    lambda m: step_loss(m, x, labels, state, t_star), has_aux=True
  )(hand)
  sgd_update(hand, grads)
  assert_params_close(trained, hand)
  assert_stats_close(trained, hand)


def test_random_step_draws_cover_all_steps_and_depend_on_step():
  key = jax.random.key(0)
  draws = [int(training.draw_time_step(key, jnp.int32(s), T)) for s in range(60)]
  assert set(draws) == set(range(T))
  assert draws == [int(training.draw_time_step(key, jnp.int32(s), T)) for s in range(60)]


def test_random_step_leaves_later_mem_bn_statistics_untouched():
  x, labels = batch()
  seed_key = jax.random.key(5)
  t_star = int(training.draw_time_step(seed_key, jnp.int32(0), T))
  if t_star == T - 1:
    seed_key = jax.random.key(6)
    t_star = int(training.draw_time_step(seed_key, jnp.int32(0), T))
  assert t_star < T - 1
  before = tiny_model(mem_bn=True)
  trained, _ = run_rule(tiny_model(mem_bn=True), "random_step", x, labels, seed_key)
  for name in ("unit1", "unit2", "unit3"):
    old = getattr(before, name).neuron.mem_bn.mean[...]
    new = getattr(trained, name).neuron.mem_bn.mean[...]
    np.testing.assert_array_equal(np.asarray(old[t_star + 1 :]), np.asarray(new[t_star + 1 :]))
    assert not np.allclose(np.asarray(old[t_star]), np.asarray(new[t_star]))


def test_bptt_is_one_update_on_the_summed_output():
  x, labels = batch()
  trained, _ = run_rule(tiny_model(neuron="lif"), "bptt", x, labels)
  hand = tiny_model(neuron="lif")

  def loss_fn(model):
    logits = model(jnp.broadcast_to(x, (T,) + x.shape), train=True, online=False)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, CLASSES), 0.1)
    return jnp.mean(optax.softmax_cross_entropy(jnp.sum(logits, 0), targets))

  grads = nnx.grad(loss_fn)(hand)
  sgd_update(hand, grads)
  assert_params_close(trained, hand)


def test_default_optimizer_is_coupled_l2_nesterov():
  params = {"w": jnp.array([1.0, -2.0])}
  grads = {"w": jnp.array([0.5, 0.25])}
  opt = training.make_optimizer()
  state = opt.init(params)
  updates, state = opt.update(grads, state, params)
  g = grads["w"] + 5e-4 * params["w"]
  # Nesterov with zero initial momentum: update = -lr (g + 0.9 g).
  np.testing.assert_allclose(updates["w"], -0.01 * (g + 0.9 * g), rtol=1e-6)


def test_learning_rate_schedule():
  lr = lambda e: float(training.epoch_learning_rate(e, base=0.01, epochs=300, warmup_epochs=5))
  assert lr(0) == pytest.approx(1e-4)
  assert lr(1) == pytest.approx(0.01 * (0.01 + 0.99 / 5))
  assert lr(5) == pytest.approx(0.01)
  assert lr(5 + 295 // 2) == pytest.approx(0.01 * 0.5 * (1 + np.cos(np.pi * 147 / 295)))
  assert lr(300) == pytest.approx(0.0, abs=1e-12)
  values = [lr(e) for e in range(5, 300)]
  assert all(a >= b for a, b in itertools.pairwise(values))


def test_set_learning_rate_changes_the_update():
  opt = training.make_optimizer()
  params = {"w": jnp.ones(3)}
  state = training.set_learning_rate(opt.init(params), 0.5)
  updates, _ = opt.update({"w": jnp.ones(3)}, state, params)
  np.testing.assert_allclose(updates["w"], -0.5 * 1.9 * (1 + 5e-4), rtol=1e-6)


def test_mix_batch_mixes_inputs_and_targets_consistently():
  x = jnp.stack([jnp.full((4, 4, 1), float(i)) for i in range(6)])
  onehot = jax.nn.one_hot(jnp.arange(6), 6)
  seen_cutmix = seen_mixup = False
  for seed in range(12):
    mixed, targets = training.mix_batch(jax.random.key(seed), x, onehot)
    np.testing.assert_allclose(jnp.sum(targets, -1), 1.0, rtol=1e-6)
    own = jnp.diagonal(targets)
    for i in range(6):
      values = np.unique(np.asarray(mixed[i]))
      if len(values) == 2:  # CutMix: pixels from two images; the target follows the area.
        seen_cutmix = True
        area = float(np.mean(np.asarray(mixed[i]) == float(i))) if float(i) in values else 0.0
        assert float(own[i]) == pytest.approx(area, abs=1e-6)
      elif len(values) == 1 and values[0] != float(i):  # Mixup: one blended value.
        seen_mixup = True
        partner = int(np.argmax(np.where(np.arange(6) == i, -1, targets[i])))
        lam = float(own[i])
        assert values[0] == pytest.approx(lam * i + (1 - lam) * partner, abs=1e-4)
  assert seen_cutmix and seen_mixup


def test_eval_step_cumulative_accuracy_and_mask():
  model = tiny_model()
  graphdef, state = training.create_train_state(model, plain_sgd())
  x, labels = batch()
  mask = jnp.array([1.0] * 6 + [0.0] * 2)
  out = jax.jit(training.make_eval_step(graphdef, training.StepConfig(time_steps=T)))(
    state, x, labels, mask
  )
  logits = model(jnp.broadcast_to(x, (T,) + x.shape), train=False)
  predictions = jnp.argmax(jnp.cumsum(logits, 0), -1)
  expected = jnp.sum((predictions == labels) * mask, axis=1)
  np.testing.assert_array_equal(np.asarray(out.correct), np.asarray(expected))
  assert float(out.count) == 6
  ce = optax.softmax_cross_entropy_with_integer_labels(jnp.mean(logits, 0), labels)
  assert float(out.loss) == pytest.approx(float(jnp.sum(ce * mask)), rel=1e-5)
  assert set(out.spikes) == {"unit1/neuron", "unit2/neuron", "unit3/neuron"}
  for name in out.spikes:
    assert 0 <= float(out.spikes[name]) <= float(out.elements[name])


def test_train_step_compiles_once_and_stays_finite():
  opt = training.make_optimizer()
  graphdef, state = training.create_train_state(tiny_model(), opt)
  step = training.make_train_step(graphdef, opt, training.StepConfig(time_steps=T))
  step = jax.jit(chex.assert_max_traces(step, n=1))
  for seed in range(3):
    x, labels = batch(seed)
    state, _ = step(state, x, labels, jnp.float32(0.01), jax.random.key(0))
  chex.assert_tree_all_finite(state.params)
  assert int(state.step) == 3


def test_bfloat16_compute_keeps_float32_parameters():
  opt = training.make_optimizer()
  graphdef, state = training.create_train_state(tiny_model(), opt)
  step = training.make_train_step(
    graphdef, opt, training.StepConfig(time_steps=T, compute_dtype=jnp.bfloat16)
  )
  x, labels = batch()
  new_state, out = jax.jit(step)(state, x, labels, jnp.float32(0.01), jax.random.key(0))
  chex.assert_trees_all_equal_dtypes(new_state.params, state.params)
  assert np.isfinite(float(out.loss))


def test_eight_device_sharded_step_matches_one_device():
  assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
  opt = training.make_optimizer()
  config = training.StepConfig(time_steps=T)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    graphdef, state = training.create_train_state(tiny_model(), opt)
    mesh = jax.sharding.Mesh(np.array(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    step = jax.jit(
      training.make_train_step(graphdef, opt, config),
      in_shardings=(replicated, sharded, sharded, None, None),
      out_shardings=(replicated, replicated),
    )
    state = jax.device_put(state, replicated)
    for seed in range(3):
      x, labels = batch(seed)
      state, _ = step(
        state,
        jax.device_put(x, sharded),
        jax.device_put(labels, sharded),
        jnp.float32(0.05),
        jax.random.key(0),
      )
    results.append(jax.device_get(state))
  chex.assert_trees_all_close(results[0].params, results[1].params, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(results[0].rest, results[1].rest, atol=1e-5, rtol=1e-5)


def test_batch_norm_recalibration_depends_on_the_weights_only():
  # Two states with the same parameters and different running averages: after reset and
  # re-estimation on the same batches they hold the same averages; parameters never move.
  x, _ = batch()
  model = tiny_model(mem_bn=True)
  optimizer = training.make_optimizer()
  graphdef, state = training.create_train_state(model, optimizer)
  _, other = training.create_train_state(
    testing.randomize(tiny_model(mem_bn=True), jax.random.key(9), scale=0.5), optimizer
  )
  other = other._replace(params=state.params)
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, state.rest, other.rest)))
  recalibrate = jax.jit(
    training.make_recalibrate_step(graphdef, training.StepConfig(time_steps=T, num_classes=CLASSES))
  )
  results = []
  for start in (state, other):
    reset = training.reset_batch_stats(graphdef, start)
    for path, variable in nnx.to_flat_state(nnx.State(reset.rest)):
      if path[-1] in ("mean", "var"):
        np.testing.assert_array_equal(np.asarray(variable[...]), float(path[-1] == "var"))
    done = recalibrate(recalibrate(reset, x), 2.0 * x)
    chex.assert_trees_all_equal(done.params, start.params)
    results.append(done.rest)
  chex.assert_trees_all_close(results[0], results[1], atol=1e-6)
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), results[0], state.rest))
  assert any(changed)


def test_code_change_counts_sign_flips_and_ternary_code_changes():
  # Binary: sign(0) = +1, so 0.0 -> -0.1 is a flip and 0.5 -> 0.4 is not: 2 of 4 change.
  old = jnp.array([[0.5, -0.2], [0.0, 0.3]])
  new = jnp.array([[0.4, 0.1], [-0.1, 0.3]])
  assert float(training.code_change_fraction(old, new, "binary")) == 0.5
  assert float(training.code_change_fraction(old, old, "binary")) == 0.0
  # Ternary: Delta = 0.7 mean|W_c|; old codes [1, -1, 0, 0] (Delta 0.3675), new codes
  # [1, 1, -1, 0] (Delta 0.42): positions 1 and 2 change.
  old_t = jnp.array([1.0, -1.0, 0.1, 0.0])
  new_t = jnp.array([1.0, 0.5, -0.9, 0.0])
  np.testing.assert_array_equal(training.weight_codes(old_t, "ternary"), [1, -1, 0, 0])
  np.testing.assert_array_equal(training.weight_codes(new_t, "ternary"), [1, 1, -1, 0])
  assert float(training.code_change_fraction(old_t, new_t, "ternary")) == 0.5
  with pytest.raises(ValueError, match="kind='float' is not allowed"):
    training.weight_codes(old_t, "float")


def test_train_step_reports_code_changes_of_every_binary_kernel():
  # Random-step and BPTT make one update per batch: the reported fraction is the one computed by
  # hand from the kernels before and after it. Online reports the mean over its T updates.
  x, labels = batch()
  for mode in ("random_step", "bptt", "online"):
    model = tiny_model()
    for _, variable in nnx.iter_graph(model):  # latent weights near zero, so that signs flip
      if isinstance(variable, layers.BinaryWeight):
        variable[...] = 0.03 * variable[...]
    optimizer = training.make_optimizer(learning_rate=0.05)
    graphdef, state = training.create_train_state(model, optimizer)
    step = jax.jit(
      training.make_train_step(
        graphdef, optimizer, training.StepConfig(mode=mode, time_steps=T, num_classes=CLASSES)
      )
    )
    new_state, out = step(state, x, labels, jnp.float32(0.05), jax.random.key(0))
    kernels = training.quantized_kernels(state.params)
    assert set(out.code_change) == set(kernels) == set(out.update_ratio)
    assert kernels and all(kind == "binary" for kind, _ in kernels.values())
    for name, (kind, before) in kernels.items():
      after = training.quantized_kernels(new_state.params)[name][1]
      by_hand = float(training.code_change_fraction(before, after, kind))
      ratio = float(jnp.linalg.norm(after - before) / jnp.linalg.norm(before))
      if mode == "online":
        assert float(out.code_change[name]) > 0.0 and float(out.update_ratio[name]) > 0
      else:
        assert by_hand > 0
        np.testing.assert_allclose(float(out.code_change[name]), by_hand, rtol=1e-6)
        np.testing.assert_allclose(float(out.update_ratio[name]), ratio, rtol=1e-5)


def test_latent_weight_decay_can_be_left_out():
  model = tiny_model()
  optimizer = training.make_optimizer(
    decay_latent=False, learning_rate=1.0, momentum=0.0, nesterov=False
  )
  _, state = training.create_train_state(model, optimizer)
  zero = jax.tree.map(jnp.zeros_like, state.params)
  updates, _ = optimizer.update(zero, state.opt_state, state.params)
  latent = training.quantized_kernels(updates)
  assert latent and all(not np.any(np.asarray(w)) for _, w in latent.values())
  floats = [
    v
    for path, v in nnx.to_flat_state(updates)
    if path[-1] == "kernel" and type(v).__name__ == "FloatWeight"
  ]
  assert floats and all(np.any(np.asarray(v.get_value())) for v in floats)


def test_latent_magnitudes_quantiles():
  model = models.create(
    "convnet_small", num_classes=CLASSES, time_steps=T, in_channels=1, width=1 / 8
  )
  _, state = training.create_train_state(model, training.make_optimizer())
  stats = training.latent_magnitudes(state.params)
  assert set(stats) == set(training.quantized_kernels(state.params))
  for entry in stats.values():
    assert 0 <= entry["p1"] <= entry["p50"] <= entry["p99"] < 1e-3  # uniform in [0, 1e-3)
    assert entry["clipped"] == 0.0


def test_step_schedule_names_the_steps_each_rule_runs_and_updates():
  key, step = jax.random.key(4), jnp.int32(9)
  assert training.step_schedule("online", T, step, key) == (T, tuple(range(T)))
  run, (t_star,) = training.step_schedule("random_step", T, step, key)
  assert int(t_star) == int(training.draw_time_step(key, step, T)) and int(run) == int(t_star) + 1
  with pytest.raises(ValueError, match="'bptt' has no step schedule"):
    training.step_schedule("bptt", T, step, key)
