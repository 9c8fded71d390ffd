"""empf_jax: EM-PF spiking neural networks with binary weights, trained online, in JAX/Flax.

EM-PF neuron (per layer and time step t, sg = stop_gradient)::

    m_t = sigmoid(a_t) * sg(u_{t-1}) + I_t;   s_t = relu(m_t - sigmoid(b_t));   u_t = m_t - s_t

Modules::

  neurons     pure step functions (empf_step, lif_step, parallel_step) and run_steps (lax.scan).
  quantize    straight-through estimators: binarize_ste, ternarize_ste, quantize_spike_ste.
  layers      Flax NNX layers: QConv, Dense, StepBatchNorm, MemBN, SECA, neuron modules.
  models      networks, their options (NetOptions) and models.create(name, ...): resnet18/19/34,
              vgg11/13, vgg_snn, convnet_small, convnet28, mlp.
  layout      a network's layers in forward order (layout_of, walk), read by deploy, efficiency
              and convert.
  training    online, random single-step and BPTT train steps, evaluation step, optimizer and
              learning-rate schedule.
  accounting  model size by the paper's rule (param_megabytes) and packed (packed_megabytes).
  deploy      fold a trained network into a packed inference model and run it (schema, fold,
              runtime); export it to ONNX (export).
  bundle      versioned, checksummed byte format for deployed models.
  efficiency  firing rates, synaptic/neuron operations and 45 nm energy.
  convert     load PyTorch state dicts (reference and HD_LIF layouts).
  ops         convolution (with a fast CPU backward), pooling, BatchNorm statistics.
  testing     helpers for tests: randomize a network's hidden state.
  dispatch    bounding how many compiled steps are in flight (InFlight) and device-side sums.
  xla_defaults  XLA CPU options for programs: ``xla_defaults.apply_cpu_defaults()``, called
              before JAX starts its backend (importing the library changes no process state).
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
