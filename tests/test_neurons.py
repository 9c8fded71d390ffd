"""Neuron maths (docs/model.md §1): hand-computed traces, exact gradients, scan == loop, Mem-BN.

The hand examples use per-step decays lambda = (0.5, 0.75, 0.25) (logits 0, ln 3, -ln 3) so that a
wrong time index changes the numbers; every expected value is worked out in the comments.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from empf_jax import layers, neurons, testing

LN3 = math.log(3.0)
DECAY_LOGITS = jnp.array([0.0, LN3, -LN3])  # lambda_t = 0.5, 0.75, 0.25
LAMBDA = np.array([0.5, 0.75, 0.25])

# EM-PF, theta = sigma(b) = 0.5, 0.25, 0.75. Three neurons (columns), currents I_t (rows).
EMPF_B = jnp.array([0.0, -LN3, LN3])
EMPF_THETA = np.array([0.5, 0.25, 0.75])
EMPF_CURRENTS = [[0.5, 1.25, 0.2], [0.5, -0.5, 0.3], [1.0, 0.25, 0.9]]
# Neuron 0: m = 0.5 (= theta_0: tie, no spike), u = 0.5; m = 0.75*0.5 + 0.5 = 0.875, s = 0.625,
#   u = 0.25; m = 0.25*0.25 + 1 = 1.0625, s = 0.3125, u = 0.75.
# Neuron 1: m = 1.25, s = 0.75, u = 0.5; m = 0.375 - 0.5 = -0.125, s = 0, u = -0.125;
#   m = -0.03125 + 0.25 = 0.21875, s = 0, u = 0.21875.
# Neuron 2: m = 0.2, s = 0, u = 0.2; m = 0.15 + 0.3 = 0.45, s = 0.2, u = 0.25;
#   m = 0.0625 + 0.9 = 0.9625, s = 0.2125, u = 0.75.
EMPF_MEMBRANE = [[0.5, 1.25, 0.2], [0.875, -0.125, 0.45], [1.0625, 0.21875, 0.9625]]
EMPF_SPIKES = [[0.0, 0.75, 0.0], [0.625, 0.0, 0.2], [0.3125, 0.0, 0.2125]]
EMPF_RESET = [[0.5, 0.5, 0.2], [0.25, -0.125, 0.25], [0.75, 0.21875, 0.75]]

# LIF, theta' = sigma(b) + 0.5 = 1.0, 1.25, 0.75.
LIF_B = jnp.array([0.0, LN3, -LN3])
LIF_THETA = np.array([1.0, 1.25, 0.75])
LIF_CURRENTS = [[1.0, 0.5, 2.5], [0.5, 1.0, 0.0], [0.5, 0.5, 0.7]]
# Neuron 0: m = 1 (= theta'_0: H(0) = 1 fires), s = 1, u = 0; m = 0.5, s = 0, u = 0.5;
#   m = 0.125 + 0.5 = 0.625 < 0.75, s = 0, u = 0.625.
# Neuron 1: m = 0.5, s = 0, u = 0.5; m = 0.375 + 1 = 1.375, s = 1.25, u = 0.125;
#   m = 0.03125 + 0.5 = 0.53125, s = 0, u = 0.53125.
# Neuron 2: m = 2.5, s = 1, u = 1.5 (soft reset); m = 1.125 < 1.25, s = 0, u = 1.125;
#   m = 0.28125 + 0.7 = 0.98125, s = 0.75, u = 0.23125.
LIF_MEMBRANE = [[1.0, 0.5, 2.5], [0.5, 1.375, 1.125], [0.625, 0.53125, 0.98125]]
LIF_SPIKES = [[1.0, 0.0, 1.0], [0.0, 1.25, 0.0], [0.0, 0.0, 0.75]]
LIF_RESET = [[0.0, 0.5, 1.5], [0.5, 0.125, 1.125], [0.625, 0.53125, 0.23125]]


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _empf(online=True, **kwargs):
  params = neurons.EMPFParams(DECAY_LOGITS, EMPF_B)

  def step(state, current, t):
    return neurons.empf_step(params, state, current, t, online=online, **kwargs)

  return step


def _lif(online=True):
  params = neurons.EMPFParams(DECAY_LOGITS, LIF_B)

  def step(state, current, t):
    return neurons.lif_step(params, state, current, t, online=online)

  return step


def _trace(step, currents):
  """Runs ``step`` with run_steps from u_0 = 0; returns spikes and the membrane after reset."""

  def traced(state, current, t):
    state, spike = step(state, current, t)
    return state, (spike, state.u)

  zero = neurons.MembraneState(jnp.zeros_like(currents[0]))
  _, (spikes, resets) = neurons.run_steps(traced, zero, currents)
  return spikes, resets


@pytest.mark.parametrize("kind", ["empf", "lif"])
def test_three_steps_by_hand(kind):
  if kind == "empf":
    step, currents, spikes, resets = _empf(), EMPF_CURRENTS, EMPF_SPIKES, EMPF_RESET
  else:
    step, currents, spikes, resets = _lif(), LIF_CURRENTS, LIF_SPIKES, LIF_RESET
  got_spikes, got_resets = _trace(step, jnp.asarray(currents))
  chex.assert_trees_all_close(got_spikes, jnp.asarray(spikes), atol=1e-6)
  chex.assert_trees_all_close(got_resets, jnp.asarray(resets), atol=1e-6)


def test_threshold_tie_at_the_first_step_is_exact():
  # theta_0 = sigma(0) = 0.5 and theta'_0 = 1.0 are exact in float32, so the ties are exact.
  empf_spikes, empf_resets = _trace(_empf(), jnp.asarray(EMPF_CURRENTS))
  lif_spikes, lif_resets = _trace(_lif(), jnp.asarray(LIF_CURRENTS))
  assert float(empf_spikes[0, 0]) == 0.0 and float(empf_resets[0, 0]) == 0.5
  assert float(lif_spikes[0, 0]) == 1.0 and float(lif_resets[0, 0]) == 0.0


def _jacobian(step, currents):
  """d s_t / d I_tau for one neuron per column: array [t, tau, neuron]."""

  def spikes(c):
    return _trace(step, c)[0]

  jac = jax.jacrev(spikes)(currents)  # [t, n, tau, n']
  return jnp.einsum("tnsn->tsn", jac)


def _bptt_jacobian(fire_slope, reset_slope):
  """Hand formula for d s_t / d I_tau through the membrane (no stop-gradient).

  d s_t/d I_t = fire_slope_t; for tau < t:
  d s_t/d I_tau = fire_slope_t * prod_{k=tau+1..t} lambda_k * prod_{k=tau..t-1} reset_slope_k,
  with reset_slope_k = d u_k / d m_k.
  """
  steps, width = fire_slope.shape
  jac = np.zeros((steps, steps, width))
  for t in range(steps):
    for tau in range(t + 1):
      chain = np.ones(width)
      for k in range(tau, t):
        chain = chain * reset_slope[k] * LAMBDA[k + 1]
      jac[t, tau] = fire_slope[t] * chain
  return jac


def test_empf_gradients_match_the_hand_formula():
  currents = jnp.asarray(EMPF_CURRENTS)
  membrane = np.asarray(EMPF_MEMBRANE)
  # d s/d m = 1[m > theta] (relu'(0) = 0 at the tie), d u/d m = 1 - 1[m > theta].
  fire = (membrane > EMPF_THETA[:, None]).astype(np.float64)
  expected = _bptt_jacobian(fire, 1.0 - fire)
  online = _jacobian(_empf(online=True), currents)
  bptt = _jacobian(_empf(online=False), currents)
  chex.assert_trees_all_close(bptt, jnp.asarray(expected, jnp.float32), atol=1e-6)
  assert np.abs(expected[1, 0]).max() > 0.7  # 0.75 for neurons 0 and 2: BPTT crosses time.
  chex.assert_trees_all_close(
    online, jnp.asarray(expected * np.eye(3)[:, :, None], jnp.float32), atol=1e-6
  )


def test_lif_gradients_match_the_triangle_surrogate():
  currents = jnp.asarray(LIF_CURRENTS)
  membrane = np.asarray(LIF_MEMBRANE)
  theta = LIF_THETA[:, None]
  # s = theta' H(m - theta'), so d s/d m = theta' max(1 - |m - theta'|, 0); u = m - s.
  fire = theta * np.maximum(1.0 - np.abs(membrane - theta), 0.0)
  expected = _bptt_jacobian(fire, 1.0 - fire)
  online = _jacobian(_lif(online=True), currents)
  bptt = _jacobian(_lif(online=False), currents)
  assert fire[0, 0] == 1.0  # at the tie the surrogate is at its peak
  chex.assert_trees_all_close(bptt, jnp.asarray(expected, jnp.float32), atol=1e-6)
  assert np.abs(expected[1, 0]).max() > 0.1
  chex.assert_trees_all_close(
    online, jnp.asarray(expected * np.eye(3)[:, :, None], jnp.float32), atol=1e-6
  )


def test_empf_fire_slope_is_the_indicator():
  theta = 0.5  # b = 0
  membrane = jnp.array([-1.0, 0.0, 0.49, 0.5, 0.51, 3.0])
  params = neurons.EMPFParams(jnp.zeros(1), jnp.zeros(1))
  g = _normal(0, membrane.shape)
  _, pullback = jax.vjp(lambda m: neurons.empf_fire(params, m, 0)[1], membrane)
  chex.assert_trees_all_equal(pullback(g)[0], g * (membrane > theta).astype(jnp.float32))


def test_heaviside_triangle_forward_and_surrogate():
  x = jnp.array([-2.0, -1.0, -0.5, -1e-3, 0.0, 0.25, 1.0, 1.5])
  chex.assert_trees_all_equal(neurons.heaviside_triangle(x), jnp.array([0.0, 0, 0, 0, 1, 1, 1, 1]))
  g = _normal(1, x.shape)
  _, pullback = jax.vjp(neurons.heaviside_triangle, x)
  chex.assert_trees_all_close(
    pullback(g)[0], g * jnp.array([0.0, 0, 0.5, 0.999, 1, 0.75, 0, 0]), atol=1e-6
  )


def test_four_bit_spikes_reset_with_the_unquantised_spike():
  # theta = 0.5, I = 1.1: s = 0.6, Q(s) = round(2.4) / 4 = 0.5, u = 1.1 - 0.6 = 0.5 (not 0.6).
  params = neurons.EMPFParams(jnp.zeros(1), jnp.zeros(1))
  zero = neurons.MembraneState(jnp.zeros(2))
  current = jnp.array([1.1, 0.3])
  state, spike = neurons.empf_step(params, zero, current, 0, spike_bits=4)
  chex.assert_trees_all_close(spike, jnp.array([0.5, 0.0]), atol=1e-7)
  chex.assert_trees_all_close(state.u, jnp.array([0.5, 0.3]), atol=1e-7)
  # The spike gradient is the straight-through identity composed with 1[m > theta].
  grad = jax.grad(lambda c: jnp.sum(neurons.empf_step(params, zero, c, 0, spike_bits=4)[1]))
  chex.assert_trees_all_equal(grad(current), jnp.array([1.0, 0.0]))


def test_mem_norm_output_drives_spike_and_reset():
  # m = 0.5 * 0.4 + 0.3 = 0.5; mem_norm doubles it to 1.0 > theta = 0.5: s = 0.5, u = 0.5.
  params = neurons.EMPFParams(jnp.zeros(2), jnp.zeros(2))
  state = neurons.MembraneState(jnp.array([0.4]))
  new, spike = neurons.empf_step(params, state, jnp.array([0.3]), 1, mem_norm=lambda m, t: 2.0 * m)
  chex.assert_trees_all_close((spike, new.u), (jnp.array([0.5]), jnp.array([0.5])), atol=1e-7)


def test_parallel_neuron_uses_the_threshold_of_each_step():
  # theta = sigma(0), sigma(ln 3) = 0.5, 0.75; I = 1 at both steps: s = 0.5, 0.25 (theta_0 would
  # give 0.5 twice).
  params = neurons.ParallelParams(jnp.array([0.0, LN3]))
  currents = jnp.ones((2, 3))
  chex.assert_trees_all_close(
    neurons.parallel_all(params, currents), jnp.array([[0.5] * 3, [0.25] * 3]), atol=1e-6
  )
  chex.assert_trees_all_close(
    neurons.parallel_all(params, currents[1:], 1), jnp.array([[0.25] * 3]), atol=1e-6
  )


@pytest.mark.parametrize("kind", ["empf", "empf_4bit_memnorm", "lif", "parallel"])
@pytest.mark.parametrize("unroll", [True, 1])
@pytest.mark.parametrize("t0", [0, 1])
def test_scan_equals_the_unrolled_loop(kind, unroll, t0):
  steps = 4
  a, b = _normal(2, (steps,)), _normal(12, (steps,))
  currents = _normal(3, (steps - t0, 2, 3))
  gain = 0.5 + jnp.abs(_normal(4, (steps, 3)))
  if kind == "empf":
    step = lambda s, c, t: neurons.empf_step(neurons.EMPFParams(a, b), s, c, t)
  elif kind == "empf_4bit_memnorm":
    step = lambda s, c, t: neurons.empf_step(
      neurons.EMPFParams(a, b), s, c, t, spike_bits=4, mem_norm=lambda m, t: gain[t] * m + 0.1
    )
  elif kind == "lif":
    step = lambda s, c, t: neurons.lif_step(neurons.EMPFParams(a, b), s, c, t)
  else:
    step = lambda s, c, t: neurons.parallel_step(neurons.ParallelParams(b), s, c, t)
  state = neurons.NoState() if kind == "parallel" else neurons.MembraneState(currents[0] * 0.3)
  final, spikes = neurons.run_steps(step, state, currents, t0, unroll=unroll)
  loop_state, loop_spikes = state, []
  for i in range(currents.shape[0]):
    loop_state, spike = step(loop_state, currents[i], t0 + i)
    loop_spikes.append(spike)
  chex.assert_trees_all_close((final, spikes), (loop_state, jnp.stack(loop_spikes)), atol=1e-6)
  if kind == "parallel":
    chex.assert_trees_all_close(
      spikes, neurons.parallel_all(neurons.ParallelParams(b), currents, t0), atol=1e-6
    )


def _membn_neuron(steps=3, features=4, key=5):
  neuron = layers.EMPFNeuron(steps, features, mem_bn=True)
  return testing.randomize(neuron, jax.random.key(key))


def _unfolded(mem_bn, m, t):
  """sigma(c_t) BN_t(m) + sigma(d_t) m with the running statistics, written out."""
  bn = (m - mem_bn.mean[...][t]) / jnp.sqrt(mem_bn.var[...][t] + layers.BN_EPSILON) * mem_bn.scale[
    ...
  ][t] + mem_bn.bias[...][t]
  return jax.nn.sigmoid(mem_bn.c[...][t]) * bn + jax.nn.sigmoid(mem_bn.d[...][t]) * m


def test_folded_mem_bn_equals_unfolded():
  neuron = _membn_neuron()
  k, h = neuron.mem_bn.folded()
  chex.assert_shape((k, h), (3, 4))
  m = _normal(6, (2, 5, 5, 4))
  for t in range(3):
    folded, moments = neuron.mem_bn.normalize(m, t, train=False)
    assert moments is None
    chex.assert_trees_all_close(folded, _unfolded(neuron.mem_bn, m, t), atol=1e-5)
    chex.assert_trees_all_close(k[t] * m + h[t], _unfolded(neuron.mem_bn, m, t), atol=1e-5)


def test_folded_mem_bn_through_empf_step_and_the_layer():
  neuron = _membn_neuron()
  currents = _normal(7, (3, 2, 5, 5, 4))
  k, h = neuron.mem_bn.folded()
  params = neuron.params()

  def unfolded_step(state, current, t):
    return neurons.empf_step(
      params, state, current, t, mem_norm=lambda m, t: _unfolded(neuron.mem_bn, m, t)
    )

  def folded_step(state, current, t):
    return neurons.empf_step(params, state, current, t, mem_norm=lambda m, t: k[t] * m + h[t])

  zero = neurons.MembraneState(jnp.zeros_like(currents[0]))
  state, spikes = zero, []
  for t in range(3):
    state, spike = unfolded_step(state, currents[t], t)
    spikes.append(spike)
  reference = (jnp.stack(spikes), state)
  chex.assert_trees_all_close(
    neurons.run_steps(folded_step, zero, currents)[::-1], reference, atol=1e-5
  )
  chex.assert_trees_all_close(neuron(currents, None, 0, train=False), reference, atol=1e-5)
  assert float(jnp.mean(reference[0] > 0)) > 0.05  # the comparison sees spikes


def test_mem_bn_training_statistics_per_step_and_running_update():
  neuron = _membn_neuron()
  old_mean, old_var = neuron.mem_bn.mean[...], neuron.mem_bn.var[...]
  currents = _normal(8, (2, 4, 3, 3, 4)) + 0.5
  params = neuron.params()
  mem_bn = neuron.mem_bn
  # Steps t0 = 1, 2 from a random state; by hand with numpy statistics of each step's batch.
  state = neurons.MembraneState(_normal(9, currents.shape[1:]))
  spikes, final = neuron(currents, state, 1, train=True)
  u = np.asarray(state.u)
  expected_spikes, means, variances = [], [], []
  for i, t in enumerate((1, 2)):
    m = float(jax.nn.sigmoid(params.a[t])) * u + np.asarray(currents[i])
    mu, var = m.mean(axis=(0, 1, 2)), m.var(axis=(0, 1, 2))
    scale, offset = np.asarray(mem_bn.scale[...][t]), np.asarray(mem_bn.bias[...][t])
    bn = (m - mu) / np.sqrt(var + layers.BN_EPSILON) * scale + offset
    gate_bn, gate_id = (float(jax.nn.sigmoid(g[...][t])) for g in (mem_bn.c, mem_bn.d))
    m_hat = gate_bn * bn + gate_id * m
    s = np.maximum(m_hat - float(jax.nn.sigmoid(params.b[t])), 0.0)
    u = m_hat - s
    expected_spikes.append(s)
    means.append(mu)
    variances.append(m.var(axis=(0, 1, 2), ddof=1))
  chex.assert_trees_all_close(
    spikes, jnp.asarray(np.stack(expected_spikes), jnp.float32), atol=1e-5
  )
  chex.assert_trees_all_close(final.u, jnp.asarray(u, jnp.float32), atol=1e-5)
  expected_mean = np.asarray(old_mean).copy()
  expected_var = np.asarray(old_var).copy()
  for i, t in enumerate((1, 2)):
    expected_mean[t] = 0.9 * expected_mean[t] + 0.1 * means[i]
    expected_var[t] = 0.9 * expected_var[t] + 0.1 * variances[i]
  chex.assert_trees_all_close(mem_bn.mean[...], jnp.asarray(expected_mean, jnp.float32), atol=1e-5)
  chex.assert_trees_all_close(mem_bn.var[...], jnp.asarray(expected_var, jnp.float32), atol=1e-5)
  chex.assert_trees_all_equal(mem_bn.mean[...][0], old_mean[0])  # step 0 did not run


@pytest.mark.parametrize("kind", ["empf", "membn", "lif", "parallel"])
def test_neuron_layers_step_by_step_equal_all_steps(kind):
  steps, features = 3, 4
  if kind == "lif":
    neuron = layers.LIFNeuron(steps, learnable=True)
  elif kind == "parallel":
    neuron = layers.ParallelNeuron(steps, spike_bits=4)
  else:
    neuron = layers.EMPFNeuron(steps, features, mem_bn=kind == "membn", spike_bits=4)
  testing.randomize(neuron, jax.random.key(10))
  stepwise = nnx.clone(neuron)
  currents = _normal(11, (steps, 2, 3, 3, features))
  spikes, final = neuron(currents, None, 0, train=True)
  state, step_spikes = None, []
  for t in range(steps):
    spike, state = stepwise(currents[t : t + 1], state, t, train=True)
    step_spikes.append(spike[0])
  chex.assert_trees_all_close((jnp.stack(step_spikes), state), (spikes, final), atol=1e-5)
  chex.assert_trees_all_close(nnx.state(stepwise), nnx.state(neuron), atol=1e-5)


@pytest.mark.parametrize("kind", ["empf", "empf_4bit_memnorm", "lif", "parallel"])
def test_half_precision_currents_keep_their_dtype(kind):
  # float32 per-step scalars must not promote bfloat16 currents: the scan carry keeps its dtype
  # (a promoted membrane made the scan fail with bfloat16 compute).
  a, b = _normal(13, (3,)), _normal(14, (3,))
  currents = _normal(15, (3, 2, 4)).astype(jnp.bfloat16)
  if kind == "parallel":
    step = lambda s, c, t: neurons.parallel_step(neurons.ParallelParams(b), s, c, t)
    state = neurons.NoState()
    chex.assert_type(neurons.parallel_all(neurons.ParallelParams(b), currents), jnp.bfloat16)
  else:
    state = neurons.MembraneState(jnp.zeros_like(currents[0]))
    if kind == "lif":
      step = lambda s, c, t: neurons.lif_step(neurons.EMPFParams(a, b), s, c, t)
    else:
      options = (
        {}
        if kind == "empf"
        else dict(spike_bits=4, mem_norm=lambda m, t: m * jnp.float32(1.5) + jnp.float32(0.1))
      )
      step = lambda s, c, t: neurons.empf_step(neurons.EMPFParams(a, b), s, c, t, **options)
  final, spikes = neurons.run_steps(step, state, currents)
  chex.assert_type([spikes, *jax.tree.leaves(final)], jnp.bfloat16)
  reference = neurons.run_steps(
    step, jax.tree.map(lambda v: v.astype(jnp.float32), state), currents.astype(jnp.float32)
  )[1]
  chex.assert_trees_all_close(spikes.astype(jnp.float32), reference, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("kind", ["empf", "membn", "lif"])
def test_online_loss_at_a_step_trains_only_that_steps_scalars(kind):
  # With sg(u_{t-1}) the last step's spikes depend on a_t, b_t (and Mem-BN's c_t, d_t, and BN_t's
  # scale and offset) of the last step only; BPTT also reaches earlier steps through the membrane.
  steps = 3
  if kind == "lif":
    neuron = layers.LIFNeuron(steps, learnable=True)
  else:
    neuron = layers.EMPFNeuron(steps, 4, mem_bn=kind == "membn")
  testing.randomize(neuron, jax.random.key(16))
  graphdef, params, rest = nnx.split(neuron, nnx.Param, ...)
  currents = _normal(17, (steps, 2, 3, 3, 4)) + 0.5

  def grads(online):
    def loss(params):
      module = nnx.merge(graphdef, params, jax.tree.map(lambda leaf: leaf, rest))
      spikes, _ = module(currents, None, 0, train=True, online=online)
      return jnp.sum(spikes[-1] * currents[-1])

    return {
      k: v[...]
      for k, v in nnx.to_flat_state(jax.jit(jax.grad(loss))(params))
      if v.shape[:1] == (steps,)
    }

  online, bptt = grads(True), grads(False)
  expected = {("a",), ("b",)} | (
    {("mem_bn", k) for k in ("c", "d", "scale", "bias")} if kind == "membn" else set()
  )
  assert set(online) == expected
  for path, grad in online.items():
    chex.assert_trees_all_equal(grad[:-1], jnp.zeros_like(grad[:-1]))
    assert float(jnp.abs(grad[-1]).max()) > 0, path
  assert all(float(jnp.abs(g[:-1]).max()) > 0 for g in bptt.values())
