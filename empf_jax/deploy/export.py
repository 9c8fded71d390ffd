"""A deployed network as an ONNX graph, for runtimes outside JAX (onnxruntime, OpenVINO, TensorRT).

:func:`to_onnx` writes the layers of :func:`empf_jax.layout.walk`, the description
:func:`empf_jax.deploy.run` executes, as ONNX operators, one copy per time step (T is small and
static, so the steps are unrolled rather than an ONNX ``Loop``): each method of :class:`_Graph`
emits what the runtime's method of the same name computes, in the same order of operations.

* Input ``x``: [T, B, H, W, C] float32 (or [T, B, F] for the fully connected network), the
  runtime's time-major NHWC layout; B is symbolic (``batch``). Inside, maps are NCHW, ONNX's
  layout for ``Conv``.
* Outputs ``cumulative``: c_t = sum_{tau <= t} f_tau for t = 1..T, [T, B, K], so a runtime can read
  the prediction at any step; ``prediction``: argmax c_T, [B] int64.
* Weights: ONNX has no 1-bit type, so binary and ternary kernels are stored as float32 codes
  (+-1, or -1/0/+1) and their per-channel scale is applied after the convolution, as in the
  runtime; the file is about 32x the bundle's packed bits.
* With an exit rule (:func:`to_onnx`'s ``rule``): :func:`empf_jax.deploy.run_early_exit`'s graph,
  step t + 1 inside an ONNX ``If`` that runs only while an example of the batch is still running.
* Opset :data:`OPSET` (17): ``ReduceMean`` still takes its axes as an attribute there, and
  onnxruntime, OpenVINO and TensorRT 8.6+ accept it.

Why a graph written from the walk rather than a converter run on :func:`empf_jax.deploy.run`
(jax2onnx, the route of other JAX SNN libraries): the walk already is the network's one
description, so the graph gets named per-layer initializers, ONNX's NCHW convolutions with the
runtime's NHWC flatten order kept where it matters, and the early-exit variant as nested ``If``
nodes, none of which a converter of ``lax.scan``/``lax.while_loop`` and the in-program bit
unpacking would give without post-processing.

The ``onnx`` package is an optional dependency (``pip install 'empf_jax[onnx]'``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from empf_jax.deploy.runtime import ExitRule, unpack_kernels
from empf_jax.deploy.schema import Deployed
from empf_jax.layout import ConvSpec, DenseSpec, NeuronSpec, walk
from empf_jax.quantize import SPIKE_LEVELS, SPIKE_MAX_CODE

OPSET = 17


def _onnx():
  try:
    import onnx
  except ImportError as error:
    raise ImportError("ONNX export needs the onnx package: pip install 'empf_jax[onnx]'") from error
  return onnx


class _Graph:
  """Nodes and initializers of one graph; registers hold value names, with their rank."""

  def __init__(self, deployed: Deployed):
    self.onnx = _onnx()
    self.arch, self.params = deployed.arch, {k: np.asarray(v) for k, v in deployed.params.items()}
    self.nodes: list[Any] = []
    self.initializers: list[Any] = []
    self._count = 0
    self._constants: set[str] = set()
    # OIHW, ONNX's layout, as float32 codes (binary, ternary) or floats.
    self.kernels = {
      name: np.transpose(np.asarray(kernel, np.float32), (3, 2, 0, 1))
      for name, kernel in unpack_kernels(self.arch, self.params).items()
    }

  # -- building blocks ------------------------------------------------------------------------
  def _name(self, hint: str) -> str:
    self._count += 1
    return f"{hint}_{self._count}"

  def node(self, op: str, inputs: list[str], hint: str = "", **attributes) -> str:
    out = self._name(hint or op.lower())
    self.nodes.append(self.onnx.helper.make_node(op, inputs, [out], **attributes))
    return out

  def constant(self, name: str, value: Any, dtype=np.float32) -> str:
    """An initializer (made once per name)."""
    if name not in self._constants:
      array = np.asarray(value, dtype=dtype)
      self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
      self._constants.add(name)
    return name

  def per_feature(self, name: str, value: np.ndarray, rank: int) -> str:
    """A [F] vector broadcast against [B, F] (rank 2) or NCHW maps [B, F, H, W] (rank 4)."""
    value = np.asarray(value, np.float32)
    if value.ndim == 0:
      return self.constant(name, value)
    shape = (1, value.shape[-1]) + (1, 1) * (rank == 4)
    return self.constant(name, value.reshape(shape))

  # -- the runtime's layers -------------------------------------------------------------------
  def conv(self, spec: ConvSpec, x: str, t: int) -> str:
    """y = s * conv(x, W_q) + C, or conv(x, W') + C (see the runtime's ``conv``)."""
    kernel = self.constant(f"{spec.name}.kernel", self.kernels[spec.name])
    p, s = spec.padding, spec.stride
    y = self.node(
      "Conv",
      [x, kernel],
      spec.name,
      pads=[p, p, p, p],
      strides=[s, s],
      kernel_shape=[spec.kernel_size, spec.kernel_size],
    )
    scale, bias = self.params.get(f"{spec.name}.scale"), self.params[f"{spec.name}.bias"]
    suffix = ""
    if spec.per_step:
      scale, bias, suffix = None if scale is None else scale[t], bias[t], f"@{t}"
    if scale is not None:
      y = self.node("Mul", [y, self.per_feature(f"{spec.name}.scale{suffix}", scale, 4)])
    return self.node("Add", [y, self.per_feature(f"{spec.name}.bias{suffix}", bias, 4)])

  def dense(self, spec: DenseSpec, x: str) -> str:
    y = self.node(
      "MatMul",
      [x, self.constant(f"{spec.name}.kernel", self.params[f"{spec.name}.kernel"])],
      spec.name,
    )
    return self.node(
      "Add", [y, self.constant(f"{spec.name}.bias", self.params[f"{spec.name}.bias"])]
    )

  def seca(self, name: str, x: str) -> str:
    """x * sigmoid(conv1d_5(mean_{h,w} x) + bias), the 1-D convolution over channels."""
    pooled = self.node("ReduceMean", [x], name, axes=[2, 3], keepdims=0)  # [B, C]
    taps = self.params[f"{name}.kernel"]
    half = taps.shape[0] // 2
    line = self.node("Unsqueeze", [pooled, self.constant("axes_1", [1], np.int64)])  # [B, 1, C]
    mixed = self.node(
      "Conv",
      [line, self.constant(f"{name}.kernel", taps.reshape(1, 1, -1))],
      pads=[half, half],
      kernel_shape=[taps.shape[0]],
    )
    mixed = self.node("Squeeze", [mixed, self.constant("axes_1", [1], np.int64)])
    gate = self.node(
      "Sigmoid",
      [self.node("Add", [mixed, self.constant(f"{name}.bias", self.params[f"{name}.bias"])])],
    )
    gate = self.node("Unsqueeze", [gate, self.constant("axes_23", [2, 3], np.int64)])
    return self.node("Mul", [x, gate])

  def neuron(self, spec: NeuronSpec, current: str, rank: int, t: int, state: dict[str, str]) -> str:
    """One neuron step from the folded parameters (see the runtime's ``neuron``)."""
    p = spec.name
    threshold = self.constant(f"{p}.threshold@{t}", self.params[f"{p}.threshold"][t])
    if spec.kind == "parallel":
      membrane = current
      spike = self.node("Relu", [self.node("Sub", [membrane, threshold])], p)
    else:
      decay = self.params[f"{p}.decay"][t]
      if spec.mem_bn:
        drive = self.node(
          "Add",
          [
            self.node(
              "Mul", [current, self.per_feature(f"{p}.gain@{t}", self.params[f"{p}.gain"][t], rank)]
            ),
            self.per_feature(f"{p}.offset@{t}", self.params[f"{p}.offset"][t], rank),
          ],
        )
      else:
        drive = current
      if p in state:  # the runtime's zero state adds decay * 0 = 0 at the first step
        leak = self.node("Mul", [state[p], self.per_feature(f"{p}.decay@{t}", decay, rank)])
        membrane = self.node("Add", [leak, drive], p)
      else:
        membrane = drive
      if spec.kind == "lif":
        fired = self.node("GreaterOrEqual", [membrane, threshold])
        spike = self.node("Where", [fired, threshold, self.constant("zero", 0.0)])
      else:
        spike = self.node("Relu", [self.node("Sub", [membrane, threshold])], p)
      state[p] = self.node("Sub", [membrane, spike], f"{p}.u")
    if spec.spike_bits is not None:  # Q(s) = clip(round(4 s), 0, 15) / 4, half to even
      code = self.node("Round", [self.node("Mul", [spike, self.constant("levels", SPIKE_LEVELS)])])
      code = self.node(
        "Clip", [code, self.constant("zero", 0.0), self.constant("max_code", SPIKE_MAX_CODE)]
      )
      spike = self.node("Div", [code, self.constant("levels", SPIKE_LEVELS)])
    return spike

  def flatten(self, h: str, rank: int) -> str:
    """[B, F] from a map, in the runtime's NHWC order."""
    if rank == 2:
      return h
    return self.node("Flatten", [self.node("Transpose", [h], perm=[0, 2, 3, 1])], axis=1)

  def step(self, rank: int, t: int, state: dict[str, str]) -> str:
    """Step t's logits [B, K] from x[t]: every layer of the walk in order, on named registers."""
    x_t = self.node("Gather", ["x", self.constant(f"t@{t}", t, np.int64)], f"x@{t}", axis=0)
    if rank == 4:  # NHWC -> NCHW
      x_t = self.node("Transpose", [x_t], "nchw", perm=[0, 3, 1, 2])
    registers = {"x": (x_t, rank)}
    for layer in walk(self.arch.layout):
      h, rank = registers[layer.source]
      if layer.kind == "conv":
        h = self.conv(layer.spec, h, t)
      elif layer.kind == "dense":
        h = self.dense(layer.spec, h)
      elif layer.kind == "neuron":
        h = self.neuron(layer.spec, h, rank, t, state)
      elif layer.kind == "seca":
        if layer.other is not None:
          h = self.node("Add", [h, registers[layer.other][0]])
        h = self.seca(layer.name, h)
      elif layer.kind == "add":
        assert layer.other is not None  # an add names its other summand
        h = self.node("Add", [h, registers[layer.other][0]])
      elif layer.kind == "max_pool":
        h = self.node("MaxPool", [h], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
      elif layer.kind == "avg_pool":
        h = self.node("AveragePool", [h], kernel_shape=[2, 2], strides=[2, 2])
      elif layer.kind == "mean":
        if rank == 4:
          h, rank = self.node("ReduceMean", [h], axes=[2, 3], keepdims=0), 2
      elif layer.kind == "flatten":
        h, rank = self.flatten(h, rank), 2
      elif layer.kind == "to_map":  # the flattened step -> [B, F, 1, 1]
        h = self.node(
          "Unsqueeze", [self.flatten(h, rank), self.constant("axes_23", [2, 3], np.int64)]
        )
        rank = 4
      else:
        raise ValueError(f"no ONNX form for layer kind {layer.kind!r}")
      registers[layer.target] = (h, rank)
    return registers["logits"][0]


def _fires(graph: _Graph, rule: ExitRule, cumulative: str, t: int) -> str | None:
  """[B] bool: whether ``rule`` fires on c_t after t steps (see :meth:`ExitRule.fires`); None
  where it never fires."""
  mean = graph.node("Div", [cumulative, graph.constant(f"steps@{t}", float(t))], "mean")
  if rule.kind == "softmax":
    if rule.threshold >= 1.0:
      return None
    top = graph.node("ReduceMax", [graph.node("Softmax", [mean], axis=1)], axes=[1], keepdims=0)
  else:  # top-1 minus top-2 (TopK keeps ties, as the two maxima of the runtime do)
    values = graph._name("top2")
    graph.nodes.append(
      graph.onnx.helper.make_node(
        "TopK",
        [mean, graph.constant("two", [2], np.int64)],
        [values, graph._name("top2_at")],
        axis=1,
      )
    )
    top = graph.node(
      "Sub",
      [
        graph.node("Gather", [values, graph.constant("index_0", 0, np.int64)], axis=1),
        graph.node("Gather", [values, graph.constant("index_1", 1, np.int64)], axis=1),
      ],
    )
  return graph.node("GreaterOrEqual", [top, graph.constant("exit_threshold", rule.threshold)])


def _until_exit(
  graph: _Graph,
  rule: ExitRule,
  rank: int,
  t: int,
  state: dict[str, str],
  carry: tuple[str, str, str] | None,
) -> tuple[str, str]:
  """(c_t at each example's exit step [B, K], exit steps [B] int32) from step t on; the steps
  after t run inside an ``If`` taken only while an example of the batch is still running, as
  :func:`empf_jax.deploy.run_early_exit`'s loop ends when all have stopped."""
  onnx = graph.onnx
  last = graph.arch.time_steps
  logits = graph.step(rank, t, state)
  if carry is None:  # every example runs step 1
    cumulative = logits
    steps = graph.node(
      "ConstantOfShape",
      [graph.node("Shape", [logits], start=0, end=1)],
      value=onnx.numpy_helper.from_array(np.ones(1, np.int32)),
    )
    done = None
  else:
    cumulative, steps, done = carry
    running = graph.node("Not", [done])
    cumulative = graph.node(
      "Where",
      [
        graph.node("Unsqueeze", [running, graph.constant("axes_1", [1], np.int64)]),
        graph.node("Add", [cumulative, logits]),
        cumulative,
      ],
      "c",
    )
    steps = graph.node("Where", [running, graph.constant(f"step@{t}", t + 1, np.int32), steps])
  if t + 1 == last:
    return cumulative, steps
  fired = _fires(graph, rule, cumulative, t + 1)
  if fired is None and done is None:
    done = graph.node(
      "Cast",
      [graph.node("Mul", [steps, graph.constant("int_zero", 0, np.int32)])],
      to=onnx.TensorProto.BOOL,
    )
  elif fired is not None:
    done = fired if done is None else graph.node("Or", [done, fired])
  assert done is not None  # set above whenever another step follows
  any_running = graph.node(
    "Cast",
    [
      graph.node(
        "ReduceMax",
        [graph.node("Cast", [graph.node("Not", [done])], to=onnx.TensorProto.INT32)],
        keepdims=0,
      )
    ],
    to=onnx.TensorProto.BOOL,
  )
  outer = graph.nodes
  graph.nodes = []
  final = _until_exit(graph, rule, rank, t + 1, dict(state), (cumulative, steps, done))
  then_nodes = graph.nodes
  graph.nodes = []
  kept = [graph.node("Identity", [cumulative]), graph.node("Identity", [steps])]
  else_nodes = graph.nodes
  graph.nodes = outer

  def branch(name, nodes, results):
    return onnx.helper.make_graph(
      nodes,
      name,
      [],
      [
        onnx.helper.make_tensor_value_info(results[0], onnx.TensorProto.FLOAT, None),
        onnx.helper.make_tensor_value_info(results[1], onnx.TensorProto.INT32, None),
      ],
    )

  outputs = [graph._name(f"c_final@{t}"), graph._name(f"steps_final@{t}")]
  graph.nodes.append(
    onnx.helper.make_node(
      "If",
      [any_running],
      outputs,
      then_branch=branch(f"step{t + 2}_on", then_nodes, final),
      else_branch=branch(f"stopped_after_{t + 1}", else_nodes, kept),
    )
  )
  return outputs[0], outputs[1]


def to_onnx(deployed: Deployed, input_shape: tuple[int, ...], rule: ExitRule | None = None):
  """The deployed network as an ONNX model (see the module docstring).

  Args:
    deployed: the deployed network.
    input_shape: one example's input at one step: (H, W, C), or (F,) for the fully connected
      network.
    rule: an exit rule: then the graph is :func:`empf_jax.deploy.run_early_exit`'s, with outputs
      ``prediction`` [B] int64, ``steps`` [B] int32 (the steps each example ran) and
      ``cumulative`` [B, K] (c_t at its exit step); each later step runs only while an example
      of the batch is still running.

  Returns:
    An ``onnx.ModelProto`` that passes ``onnx.checker.check_model(full_check=True)``.
  """
  graph = _Graph(deployed)
  onnx = graph.onnx
  steps = deployed.arch.time_steps
  rank = len(input_shape) + 1
  if rank not in (2, 4):
    raise ValueError(f"input_shape {input_shape} is neither (H, W, C) nor (F,)")
  classes = next(
    layer.spec.out_features for layer in walk(deployed.arch.layout) if layer.target == "logits"
  )
  inputs = [
    onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [steps, "batch", *input_shape])
  ]
  if rule is not None:
    cumulative, ran = _until_exit(graph, rule, rank, 0, {}, None)
    graph.nodes += [
      onnx.helper.make_node("Identity", [cumulative], ["cumulative"]),
      onnx.helper.make_node("Identity", [ran], ["steps"]),
      onnx.helper.make_node("ArgMax", [cumulative], ["prediction"], axis=1, keepdims=0),
    ]
    outputs = [
      onnx.helper.make_tensor_value_info("prediction", onnx.TensorProto.INT64, ["batch"]),
      onnx.helper.make_tensor_value_info("steps", onnx.TensorProto.INT32, ["batch"]),
      onnx.helper.make_tensor_value_info("cumulative", onnx.TensorProto.FLOAT, ["batch", classes]),
    ]
    return _model(graph, deployed, inputs, outputs)
  state: dict[str, str] = {}
  totals: list[str] = []
  for t in range(steps):
    logits = graph.step(rank, t, state)
    total = logits if not totals else graph.node("Add", [totals[-1], logits], "c")
    totals.append(total)
  stacked = graph.node(
    "Concat",
    [graph.node("Unsqueeze", [c, graph.constant("axes_0", [0], np.int64)]) for c in totals],
    "cumulative_all",
    axis=0,
  )
  graph.nodes.append(onnx.helper.make_node("Identity", [stacked], ["cumulative"]))
  graph.nodes.append(
    onnx.helper.make_node("ArgMax", [totals[-1]], ["prediction"], axis=1, keepdims=0)
  )
  outputs = [
    onnx.helper.make_tensor_value_info(
      "cumulative", onnx.TensorProto.FLOAT, [steps, "batch", classes]
    ),
    onnx.helper.make_tensor_value_info("prediction", onnx.TensorProto.INT64, ["batch"]),
  ]
  return _model(graph, deployed, inputs, outputs)


def _model(graph: _Graph, deployed: Deployed, inputs: list[Any], outputs: list[Any]):
  onnx = graph.onnx
  body = onnx.helper.make_graph(
    graph.nodes, deployed.arch.name, inputs, outputs, graph.initializers
  )
  model = onnx.helper.make_model(
    body, producer_name="empf_jax", opset_imports=[onnx.helper.make_opsetid("", OPSET)]
  )
  model.ir_version = 8  # opset 17's IR version, for runtimes older than the onnx package
  onnx.checker.check_model(model, full_check=True)
  return model
