"""PyTorch reference implementation of the EM-PF spiking ResNets (docs/model.md §1-4).

Written from docs/model.md the way PyTorch spiking-network code is usually written: eager,
NCHW, one call of the network per time step, neuron modules that keep their own membrane and step
counter between calls (``reset()`` clears them), ``detach()`` of the previous membrane for online
training, and a Python loop over time in the training functions. It is the benchmark peer of the
JAX implementation and an independent numerical cross-check of it
(``tests/test_torch_crosscheck.py``).

EM-PF neuron, one layer, step t (0-based here):

    m_t = sigma(a_t) * detach(u_{t-1}) + I_t      (no detach for BPTT)
    [m_t <- sigma(c_t) BN_t(m_t) + sigma(d_t) m_t]  (Mem-BN)
    s_t = relu(m_t - sigma(b_t)),   u_t = m_t - s_t,   output Q(s_t) with 4-bit spikes

Binary convolution: W_b = alpha_o sign(W), sign(0) = +1, alpha_o = mean |W| over each output
channel's kernel, gradient dL/dW = dL/dW_b * 1[|W| <= 1]. Every BatchNorm2d is applied once per
time step, so in training it normalises with the current step's batch statistics and updates its
running averages once per step.

State-dict keys are empf_jax's module paths with PyTorch's leaf names (``stem.conv.weight``,
``blocks.3.bn1.running_var``, ``blocks.0.act1.a``, ...): the ``reference`` layout of
:mod:`empf_jax.convert`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from empf_jax.models import CONVNET28_PLAN

LATENT_INIT_MAX = 1e-3
TERNARY_DELTA_FACTOR = 0.7
SPIKE_LEVELS = 4.0
SPIKE_MAX_CODE = 15.0
SECA_TAPS = 5
LABEL_SMOOTHING = 0.1
RESNETS = {
  # name: (blocks per stage, stage widths, stage strides, hidden FC width)
  "resnet18": ((2, 2, 2, 2), (64, 128, 256, 512), (1, 2, 2, 2), None),
  "resnet34": ((3, 4, 6, 3), (64, 128, 256, 512), (1, 2, 2, 2), None),
  "resnet19": ((3, 3, 2), (128, 256, 512), (1, 2, 2), 256),
}
STEMS = ("cifar", "imagenet", "tiny", "event")
CONVNET28_FLATTEN = 7  # 28x28 inputs after two 2x2 poolings


class BinarizeSTE(torch.autograd.Function):
  """W_b = alpha_o sign(W) (sign(0) = +1, alpha_o = mean |W| per output channel of an OIHW
  kernel); backward dL/dW = dL/dW_b * 1[|W| <= 1], alpha gets no gradient."""

  @staticmethod
  def forward(ctx, w: torch.Tensor) -> torch.Tensor:
    ctx.save_for_backward(w)
    alpha = w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)
    return alpha * torch.where(w >= 0, 1.0, -1.0).to(w.dtype)

  @staticmethod
  def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    (w,) = ctx.saved_tensors
    return grad * (w.abs() <= 1.0).to(grad.dtype)


class TernarizeSTE(torch.autograd.Function):
  """TWN rule: W_c = clip(W, -1, 1), Delta = 0.7 mean |W_c|, alpha = mean of |W_c| above Delta
  (0 if none), W_t = alpha (1[W_c > Delta] - 1[W_c < -Delta]); backward dL/dW * 1[-1 < W < 1]."""

  @staticmethod
  def forward(ctx, w: torch.Tensor) -> torch.Tensor:
    ctx.save_for_backward(w)
    wc = w.clamp(-1.0, 1.0)
    delta = TERNARY_DELTA_FACTOR * wc.abs().mean()
    pos, neg = wc > delta, wc < -delta
    mask = pos | neg
    count = mask.sum()
    alpha = torch.where(count > 0, (wc.abs() * mask).sum() / count.clamp(min=1), 0.0)
    return alpha * (pos.to(w.dtype) - neg.to(w.dtype))

  @staticmethod
  def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    (w,) = ctx.saved_tensors
    return grad * ((w > -1.0) & (w < 1.0)).to(grad.dtype)


class SpikeQuantizeSTE(torch.autograd.Function):
  """4-bit spikes Q(s) = clip(round(4 s), 0, 15) / 4 with an identity gradient."""

  @staticmethod
  def forward(ctx, s: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(SPIKE_LEVELS * s), 0.0, SPIKE_MAX_CODE) / SPIKE_LEVELS

  @staticmethod
  def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    return grad


QUANTIZERS = {"binary": BinarizeSTE.apply, "ternary": TernarizeSTE.apply}


class QConv2d(nn.Module):
  """Bias-free convolution with binary, ternary or full-precision weights (OIHW ``weight``).

  Latent binary/ternary weights start uniform in [0, 1e-3) (the authors' initialisation);
  full-precision kernels are Kaiming-normal with fan_out.
  """

  def __init__(
    self,
    cin: int,
    cout: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: int | None = None,
    weights: str = "binary",
  ):
    super().__init__()
    if weights not in ("binary", "ternary", "float"):
      raise ValueError(f"weights={weights!r} is not allowed; allowed: 'binary', 'ternary', 'float'")
    self.stride = stride
    self.padding = kernel // 2 if padding is None else padding
    self.weights = weights
    self.weight = nn.Parameter(torch.empty(cout, cin, kernel, kernel))
    if weights == "float":
      nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
    else:
      nn.init.uniform_(self.weight, 0.0, LATENT_INIT_MAX)

  def effective_weight(self) -> torch.Tensor:
    if self.weights == "float":
      return self.weight
    return QUANTIZERS[self.weights](self.weight)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, self.effective_weight(), stride=self.stride, padding=self.padding)


class MemBN(nn.Module):
  """Membrane BatchNorm m_hat_t = sigma(c_t) BN_t(m_t) + sigma(d_t) m_t, one BatchNorm2d per step.

  As in the authors' code, BN_t is a separate module, so at steps other than t its parameters get
  no gradient and ``torch.optim.SGD`` skips them entirely (no weight decay, no momentum step).
  """

  def __init__(self, time_steps: int, features: int):
    super().__init__()
    self.c = nn.Parameter(torch.zeros(time_steps))
    self.d = nn.Parameter(torch.zeros(time_steps))
    self.bn = nn.ModuleList(nn.BatchNorm2d(features) for _ in range(time_steps))

  def forward(self, m: torch.Tensor, t: int) -> torch.Tensor:
    return self.c[t].sigmoid() * self.bn[t](m) + self.d[t].sigmoid() * m


class EMPFNeuron(nn.Module):
  """Stateful EM-PF neuron: one call per time step; ``reset()`` before a new sequence.

  ``online=True`` detaches the previous membrane (docs/model.md §1,
  m_t = lambda_t sg(u_{t-1}) + I_t);
  ``online=False`` keeps the gradient through time (BPTT).
  """

  def __init__(
    self, time_steps: int, features: int, *, mem_bn: bool = False, spike_bits: int | None = None
  ):
    super().__init__()
    self.a = nn.Parameter(torch.zeros(time_steps))
    self.b = nn.Parameter(torch.zeros(time_steps))
    self.mem_bn = MemBN(time_steps, features) if mem_bn else None
    self.spike_bits = spike_bits
    self.online = True
    self.t = 0
    self.u: torch.Tensor | None = None

  def reset(self) -> None:
    self.t = 0
    self.u = None

  def forward(self, current: torch.Tensor) -> torch.Tensor:
    if self.u is None:
      self.u = torch.zeros_like(current)
    u_prev = self.u.detach() if self.online else self.u
    m = self.a[self.t].sigmoid() * u_prev + current
    if self.mem_bn is not None:
      m = self.mem_bn(m, self.t)
    spike = F.relu(m - self.b[self.t].sigmoid())
    self.u = m - spike
    self.t += 1
    return SpikeQuantizeSTE.apply(spike) if self.spike_bits == 4 else spike


class ParallelNeuron(nn.Module):
  """Stateless neuron s_t = relu(I_t - sigma(b_t)) (with the per-step threshold theta_t)."""

  def __init__(self, time_steps: int, *, spike_bits: int | None = None):
    super().__init__()
    self.b = nn.Parameter(torch.zeros(time_steps))
    self.spike_bits = spike_bits
    self.t = 0

  def reset(self) -> None:
    self.t = 0

  def forward(self, current: torch.Tensor) -> torch.Tensor:
    spike = F.relu(current - self.b[self.t].sigmoid())
    self.t += 1
    return SpikeQuantizeSTE.apply(spike) if self.spike_bits == 4 else spike


class SECA(nn.Module):
  """x * sigmoid(conv1d_5(GAP(x))) over channels (one Conv1d with 5 taps and a bias)."""

  def __init__(self):
    super().__init__()
    self.conv = nn.Conv1d(1, 1, SECA_TAPS, padding=SECA_TAPS // 2)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    pooled = x.mean(dim=(2, 3))[:, None, :]
    gate = self.conv(pooled)[:, 0].sigmoid()
    return x * gate[:, :, None, None]


class BasicBlock(nn.Module):
  """Pre-activation block: out = SECA1(BN(conv1(act1(x)))); out = SECA2(BN(conv2(act2(out)))) +
  shortcut(x); SECA-II adds the block input / intermediate current inside the gates (in == out)."""

  def __init__(
    self,
    cin: int,
    cout: int,
    stride: int,
    *,
    time_steps: int,
    weights: str,
    mem_bn: bool,
    parallel: bool,
    spike_bits: int | None,
    seca: int,
  ):
    super().__init__()
    self.seca_variant = 1 if (seca == 2 and cin != cout) else seca
    self.act1 = EMPFNeuron(time_steps, cin, mem_bn=mem_bn, spike_bits=spike_bits)
    self.conv1 = QConv2d(cin, cout, 3, stride=stride, weights=weights)
    self.bn1 = nn.BatchNorm2d(cout)
    if parallel:
      self.act2 = ParallelNeuron(time_steps, spike_bits=spike_bits)
    else:
      self.act2 = EMPFNeuron(time_steps, cout, mem_bn=mem_bn, spike_bits=spike_bits)
    self.conv2 = QConv2d(cout, cout, 3, weights=weights)
    self.bn2 = nn.BatchNorm2d(cout)
    self.seca1 = SECA() if seca else None
    self.seca2 = SECA() if seca else None
    if stride != 1 or cin != cout:
      self.shortcut_conv = QConv2d(cin, cout, 1, stride=stride, padding=0, weights=weights)
      self.shortcut_bn = nn.BatchNorm2d(cout)
    else:
      self.shortcut_conv = None
      self.shortcut_bn = None

  def _attend(self, seca: SECA | None, residual: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if seca is None:
      return y
    return seca(residual + y) if self.seca_variant == 2 else seca(y)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = self._attend(self.seca1, x, self.bn1(self.conv1(self.act1(x))))
    y = self._attend(self.seca2, out, self.bn2(self.conv2(self.act2(out))))
    if self.shortcut_conv is None:
      return y + x
    return y + self.shortcut_bn(self.shortcut_conv(x))


class Stem(nn.Module):
  """Full-precision first convolution + BN (+ 3x3/2 max pooling for the ImageNet/Tiny stems)."""

  def __init__(self, kind: str, cin: int, cout: int):
    super().__init__()
    self.kind = kind
    if kind == "imagenet":
      self.conv = QConv2d(cin, cout, 7, stride=2, padding=3, weights="float")
    else:
      self.conv = QConv2d(cin, cout, 3, weights="float")
    self.bn = nn.BatchNorm2d(cout)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.bn(self.conv(x))
    if self.kind in ("imagenet", "tiny"):
      y = F.max_pool2d(y, 3, stride=2, padding=1)
    return y


class SpikingNetwork(nn.Module):
  """What the training functions need of a network: its neurons' reset and online switch."""

  def neurons(self) -> Iterator[nn.Module]:
    return (m for m in self.modules() if isinstance(m, (EMPFNeuron, ParallelNeuron)))

  def reset(self) -> None:
    """Zero membranes and step counters before a new input sequence."""
    for neuron in self.neurons():
      neuron.reset()

  def set_online(self, online: bool) -> None:
    """Detach the previous membrane (online training) or keep the graph through time (BPTT)."""
    for neuron in self.neurons():
      if isinstance(neuron, EMPFNeuron):
        neuron.online = online


class SpikingResNet(SpikingNetwork):
  """EM-PF ResNet-18/34/19 (docs/model.md §3); ``forward`` is ONE time step on NCHW input."""

  def __init__(
    self,
    blocks: tuple[int, ...],
    widths: tuple[int, ...],
    strides: tuple[int, ...],
    *,
    num_classes: int,
    in_channels: int,
    stem: str,
    time_steps: int,
    weights: str,
    mem_bn: bool,
    parallel: bool,
    spike_bits: int | None,
    seca: int,
    width: float,
    hidden: int | None,
  ):
    super().__init__()
    self.time_steps = time_steps

    def channels(base: int) -> int:
      return max(1, int(round(base * width)))

    cin = channels(64)
    self.stem = Stem(stem, in_channels, cin)
    layers = []
    for count, base, stride in zip(blocks, widths, strides):
      cout = channels(base)
      for i in range(count):
        layers.append(
          BasicBlock(
            cin,
            cout,
            stride if i == 0 else 1,
            time_steps=time_steps,
            weights=weights,
            mem_bn=mem_bn,
            parallel=parallel,
            spike_bits=spike_bits,
            seca=seca,
          )
        )
        cin = cout
    self.blocks = nn.ModuleList(layers)
    if hidden is None:
      self.fc_hidden = None
      self.head_neuron = None
      self.fc = nn.Linear(cin, num_classes)
    else:
      self.fc_hidden = nn.Linear(cin, channels(hidden))
      self.head_neuron = EMPFNeuron(time_steps, channels(hidden), spike_bits=spike_bits)
      self.fc = nn.Linear(channels(hidden), num_classes)

  def forward(self, x_t: torch.Tensor) -> torch.Tensor:
    """One time step: x_t [B, C, H, W] -> logits [B, K]; neuron state carries to the next call."""
    h = self.stem(x_t)
    for block in self.blocks:
      h = block(h)
    h = h.mean(dim=(2, 3))
    if self.fc_hidden is not None:
      h = self.head_neuron(self.fc_hidden(h))
    return self.fc(h)


class ConvUnit(nn.Module):
  """conv3x3 -> BN -> EM-PF neuron, one unit of the plain networks."""

  def __init__(self, cin: int, cout: int, *, time_steps: int, weights: str):
    super().__init__()
    self.conv = QConv2d(cin, cout, 3, weights=weights)
    self.bn = nn.BatchNorm2d(cout)
    self.neuron = EMPFNeuron(time_steps, cout)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.neuron(self.bn(self.conv(x)))


class SpikingConvNet28(SpikingNetwork):
  """convnet28 of empf_jax (docs/model.md §3): full-precision unit, 2x2 average pooling, binary
  units, pooling, binary unit, the 7x7 maps flattened (in NHWC order, as empf_jax) into the
  classifier. ``forward`` is ONE time step on NCHW input."""

  def __init__(
    self,
    plan: tuple[int | str, ...],
    *,
    num_classes: int,
    in_channels: int,
    time_steps: int,
    weights: str,
    width: float,
    flatten_to: int,
  ):
    super().__init__()
    self.time_steps = time_steps
    self.plan = plan
    units = []
    cin = in_channels
    for i, item in enumerate(plan):
      if isinstance(item, str):
        continue
      cout = max(1, int(round(item * width)))
      units.append(
        ConvUnit(cin, cout, time_steps=time_steps, weights="float" if i == 0 else weights)
      )
      cin = cout
    self.units = nn.ModuleList(units)
    self.fc = nn.Linear(cin * flatten_to * flatten_to, num_classes)

  def forward(self, x_t: torch.Tensor) -> torch.Tensor:
    h = x_t
    units = iter(self.units)
    for item in self.plan:
      h = F.avg_pool2d(h, 2) if item == "M" else next(units)(h)
    return self.fc(h.permute(0, 2, 3, 1).flatten(1))


def create(
  name: str,
  *,
  num_classes: int,
  time_steps: int,
  in_channels: int | None = None,
  stem: str = "cifar",
  weights: str = "binary",
  mem_bn: bool = False,
  parallel: bool = False,
  spike_bits: int | None = None,
  seca: int = 0,
  width: float = 1.0,
) -> SpikingNetwork:
  """Builds ``resnet18``, ``resnet34``, ``resnet19`` or ``convnet28`` with the options of
  ``empf_jax.models`` (``convnet28``: ``num_classes``, ``time_steps``, ``in_channels`` (default
  1), ``weights`` and ``width``; its other options keep their defaults).

  Raises:
    ValueError: naming the unsupported option and the allowed values.
  """
  if name == "convnet28":
    if (stem, mem_bn, parallel, spike_bits, seca) != ("cifar", False, False, None, 0):
      raise ValueError(
        "convnet28 takes only num_classes, time_steps, in_channels, weights and width here"
      )
    return SpikingConvNet28(
      CONVNET28_PLAN,
      num_classes=num_classes,
      in_channels=1 if in_channels is None else in_channels,
      time_steps=time_steps,
      weights=weights,
      width=width,
      flatten_to=CONVNET28_FLATTEN,
    )
  if name not in RESNETS:
    raise ValueError(f"name={name!r} is not allowed; allowed: {', '.join((*RESNETS, 'convnet28'))}")
  if stem not in STEMS:
    raise ValueError(f"stem={stem!r} is not allowed; allowed: {', '.join(STEMS)}")
  if spike_bits not in (None, 4):
    raise ValueError(f"spike_bits={spike_bits!r} is not allowed; allowed: None, 4")
  if seca not in (0, 1, 2):
    raise ValueError(f"seca={seca!r} is not allowed; allowed: 0, 1, 2")
  blocks, widths, strides, hidden = RESNETS[name]
  if name == "resnet19" and stem == "event":
    strides = (2,) + strides[1:]
  if in_channels is None:
    in_channels = 2 if stem == "event" else 3
  return SpikingResNet(
    blocks,
    widths,
    strides,
    num_classes=num_classes,
    in_channels=in_channels,
    stem=stem,
    time_steps=time_steps,
    weights=weights,
    mem_bn=mem_bn,
    parallel=parallel,
    spike_bits=spike_bits,
    seca=seca,
    width=width,
    hidden=hidden,
  )


def make_optimizer(model: nn.Module, lr: float = 0.01) -> torch.optim.SGD:
  """SGD, Nesterov momentum 0.9, weight decay 5e-4 added to the gradient (all parameters)."""
  return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)


def loss_function() -> nn.CrossEntropyLoss:
  """Cross-entropy with label smoothing 0.1."""
  return nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)


def repeat_static(images: torch.Tensor, time_steps: int) -> torch.Tensor:
  """Direct encoding: [B, C, H, W] -> [T, B, C, H, W], the same image at every step."""
  return images.unsqueeze(0).expand(time_steps, *images.shape)


@torch.no_grad()
def run_eval(model: SpikingResNet, x: torch.Tensor) -> torch.Tensor:
  """All steps in evaluation mode (running BN statistics): x [T, B, C, H, W] -> logits [T, B, K]."""
  model.eval()
  model.reset()
  logits = torch.stack([model(x_t) for x_t in x])
  model.reset()
  return logits


def online_step(
  model: SpikingResNet, optimizer: torch.optim.Optimizer, x: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
  """Online training on one batch: for t = 1..T, loss_t = CE_ls(f_t(x), y) with the previous
  membrane detached, backward, one optimizer step. T updates; returns the T losses."""
  model.train()
  model.set_online(True)
  model.reset()
  loss_fn = loss_function()
  losses = []
  for x_t in x:
    optimizer.zero_grad()
    loss = loss_fn(model(x_t), labels)
    loss.backward()
    optimizer.step()
    losses.append(loss.detach())
  model.reset()
  return torch.stack(losses)


def random_step(
  model: SpikingResNet,
  optimizer: torch.optim.Optimizer,
  x: torch.Tensor,
  labels: torch.Tensor,
  t_star: int,
) -> torch.Tensor:
  """Random single-step training: steps t < t* forward only (state and BN statistics), one
  update at t* (0-based), steps after t* not computed. Returns the loss at t*."""
  model.train()
  model.set_online(True)
  model.reset()
  with torch.no_grad():
    for x_t in x[:t_star]:
      model(x_t)
  optimizer.zero_grad()
  loss = loss_function()(model(x[t_star]), labels)
  loss.backward()
  optimizer.step()
  model.reset()
  return loss.detach()


def bptt_step(
  model: SpikingResNet, optimizer: torch.optim.Optimizer, x: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
  """BPTT baseline: loss CE_ls(sum_t f_t(x), y) with gradients through time, one update."""
  model.train()
  model.set_online(False)
  model.reset()
  optimizer.zero_grad()
  total = sum(model(x_t) for x_t in x)
  loss = loss_function()(total, labels)
  loss.backward()
  optimizer.step()
  model.reset()
  model.set_online(True)
  return loss.detach()
