"""empf_jax: EM-PF spiking neural networks with binary weights, trained online, in JAX/Flax.

EM-PF neuron (per layer and time step t, sg = stop_gradient)::

    m_t = sigmoid(a_t) * sg(u_{t-1}) + I_t;   s_t = relu(m_t - sigmoid(b_t));   u_t = m_t - s_t

Each module says in its docstring what it holds (``help(empf_jax.neurons)``); the documentation's
API reference lists them all with those docstrings. The names below are re-exported here.
"""

from empf_jax import (
  accounting,
  bundle,
  convert,
  deploy,
  efficiency,
  layers,
  layout,
  models,
  neurons,
  ops,
  quantize,
  testing,
  training,
  xla_defaults,
)
from empf_jax.accounting import packed_megabytes, param_megabytes
from empf_jax.models import ConfigError, NetOptions, create
from empf_jax.neurons import empf_step, lif_step, parallel_step, run_steps
from empf_jax.quantize import binarize_ste, quantize_spike_ste, ternarize_ste

__version__ = "0.1.0"

__all__ = [
  "ConfigError",
  "NetOptions",
  "accounting",
  "binarize_ste",
  "bundle",
  "convert",
  "create",
  "deploy",
  "efficiency",
  "empf_step",
  "layers",
  "layout",
  "lif_step",
  "models",
  "neurons",
  "ops",
  "packed_megabytes",
  "parallel_step",
  "param_megabytes",
  "quantize",
  "quantize_spike_ste",
  "run_steps",
  "ternarize_ste",
  "testing",
  "training",
  "xla_defaults",
]
