"""Size accounting (docs/model.md §2): paper figures on abstract full-size networks; hand counts.

Full-size networks are only built abstractly (``nnx.eval_shape``): no weight is allocated.
"""

import chex
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from empf_jax import accounting, layers, models


def _abstract(name, **options):
  model = nnx.eval_shape(lambda: models.create(name, **options))
  leaves = jax.tree.leaves(nnx.state(model))
  assert leaves and all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
  return model


# (network, options, paper MB by the authors' rule: binary 2 bits, ternary 3 bits, float 32 bits)
PAPER_FIGURES = [
  ("resnet18", dict(num_classes=10), 2.82),
  ("resnet18", dict(num_classes=10, weights="float"), 44.66),
  ("resnet18", dict(num_classes=100), 3.00),
  ("resnet18", dict(num_classes=100, weights="ternary"), 4.40),
  ("resnet18", dict(num_classes=100, weights="float"), 44.84),
  ("resnet34", dict(num_classes=1000, stem="imagenet", weights="ternary"), 10.06),
  ("resnet34", dict(num_classes=1000, stem="imagenet", weights="float"), 87.12),
  ("vgg_snn", dict(num_classes=10), 2.49),
  ("vgg_snn", dict(num_classes=10, weights="float"), 37.05),
]


@pytest.mark.parametrize(
  "name,options,figure",
  PAPER_FIGURES,
  ids=[f"{n}-{o.get('num_classes')}-{o.get('weights', 'binary')}" for n, o, _ in PAPER_FIGURES],
)
def test_paper_size_figures(name, options, figure):
  model = _abstract(name, time_steps=4, **options)
  assert abs(accounting.param_megabytes(model) - figure) <= 0.005, accounting.param_megabytes(model)


def test_vgg_snn_binary_size_to_the_byte():
  model = _abstract("vgg_snn", num_classes=10, time_steps=10)
  # Binary convs 2->64->128->256->256->512 x4 (3x3): 9,217,152 weights at 2 bits;
  # classifier 512*3*3*10 + 10 = 46,090 floats. 2,304,288 + 184,360 = 2,488,648 bytes.
  assert accounting.weight_counts(model) == {
    "BinaryWeight": 9_217_152,
    "TernaryWeight": 0,
    "FloatWeight": 46_090,
  }
  assert abs(accounting.param_megabytes(model) * 1e6 - 2_488_648) < 1e-6


def _resnet_counts(blocks, widths, strides, *, stem_weights, head):
  """Quantised and float weight counts of a ResNet written out from docs/model.md §3."""
  quantised, cin = 0, 64
  for count, cout, stride in zip(blocks, widths, strides):
    for i in range(count):
      quantised += 9 * cin * cout + 9 * cout * cout
      if (i == 0 and stride != 1) or cin != cout:
        quantised += cin * cout  # 1x1 downsample shortcut
      cin = cout
  return quantised, stem_weights + sum(i * o + o for i, o in head)


@pytest.mark.parametrize(
  "name,options,counts",
  [
    (
      "resnet18",
      dict(num_classes=10),
      _resnet_counts(
        (2, 2, 2, 2), (64, 128, 256, 512), (1, 2, 2, 2), stem_weights=9 * 3 * 64, head=[(512, 10)]
      ),
    ),
    (
      "resnet34",
      dict(num_classes=1000, stem="imagenet"),
      _resnet_counts(
        (3, 4, 6, 3),
        (64, 128, 256, 512),
        (1, 2, 2, 2),
        stem_weights=49 * 3 * 64,
        head=[(512, 1000)],
      ),
    ),
    (
      "resnet19",
      dict(num_classes=10),
      _resnet_counts(
        (3, 3, 2), (128, 256, 512), (1, 2, 2), stem_weights=9 * 3 * 64, head=[(512, 256), (256, 10)]
      ),
    ),
  ],
)
def test_resnet_weight_counts_by_hand(name, options, counts):
  quantised, floats = counts
  model = _abstract(name, time_steps=4, **options)
  assert accounting.weight_counts(model) == {
    "BinaryWeight": quantised,
    "TernaryWeight": 0,
    "FloatWeight": floats,
  }


def test_packed_megabytes_by_hand():
  # convnet_small, width 1/4 (W = 8), 1 input channel, 10 classes, SECA-I after each conv:
  # float: stem 9*1*8 = 72, FC 16*10 + 10 = 170, 3 SECA x 6 = 18 -> 260 weights, 1,040 bytes;
  # quantised: 9*8*16 + 9*16*16 = 3,456 weights.
  common = dict(num_classes=10, time_steps=2, in_channels=1, width=0.25, seca=1)
  binary = _abstract("convnet_small", **common)
  ternary = _abstract("convnet_small", weights="ternary", **common)
  floating = _abstract("convnet_small", weights="float", **common)
  assert accounting.weight_counts(binary) == {
    "BinaryWeight": 3456,
    "TernaryWeight": 0,
    "FloatWeight": 260,
  }
  assert accounting.packed_megabytes(binary) == pytest.approx((3456 / 8 + 1040) / 1e6, abs=1e-12)
  assert accounting.param_megabytes(binary) == pytest.approx((3456 / 4 + 1040) / 1e6, abs=1e-12)
  assert accounting.packed_megabytes(ternary) == pytest.approx((3456 / 4 + 1040) / 1e6, abs=1e-12)
  assert accounting.param_megabytes(ternary) == pytest.approx(
    (3456 * 3 / 8 + 1040) / 1e6, abs=1e-12
  )
  assert accounting.packed_megabytes(floating) == accounting.param_megabytes(floating)
  assert accounting.param_megabytes(floating) == pytest.approx((3456 + 260) * 4 / 1e6, abs=1e-12)


def test_packed_resnet18_by_hand():
  # 11,157,504 binary weights at 1 bit, stem 1,728 + FC 5,130 floats at 4 bytes.
  model = _abstract("resnet18", num_classes=10, time_steps=4)
  assert accounting.packed_megabytes(model) == pytest.approx(
    (11_157_504 / 8 + 6_858 * 4) / 1e6, abs=1e-12
  )


@pytest.mark.parametrize(
  "options",
  [
    dict(mem_bn=True),
    dict(neuron="lif", learnable_lif=True),
    dict(neuron="lif"),
    dict(parallel=True, spike_bits=4),
  ],
)
def test_neuron_scalars_and_batch_norm_are_excluded(options):
  base = accounting.weight_counts(_abstract("resnet18", num_classes=10, time_steps=4))
  assert (
    accounting.weight_counts(_abstract("resnet18", num_classes=10, time_steps=4, **options)) == base
  )


def test_seca_parameters_count_as_float():
  plain = accounting.weight_counts(_abstract("resnet18", num_classes=10, time_steps=4))
  seca = accounting.weight_counts(_abstract("resnet18", num_classes=10, time_steps=4, seca=2))
  assert seca["FloatWeight"] - plain["FloatWeight"] == 8 * 2 * 6  # two SECAs in each of 8 blocks
  assert seca["BinaryWeight"] == plain["BinaryWeight"]


def test_concrete_and_abstract_models_agree():
  options = dict(num_classes=10, time_steps=2, in_channels=1, width=0.25, weights="ternary")
  concrete = models.create("convnet_small", rngs=nnx.Rngs(jax.random.key(0, impl="rbg")), **options)
  abstract = _abstract("convnet_small", **options)
  assert accounting.weight_counts(concrete) == accounting.weight_counts(abstract)
  assert accounting.param_megabytes(concrete) == accounting.param_megabytes(abstract)
  chex.assert_trees_all_equal_shapes(nnx.state(concrete), nnx.state(abstract))
  assert isinstance(concrete.unit2.conv.kernel, layers.TernaryWeight)
  assert jnp.asarray(concrete.unit2.conv.kernel[...]).dtype == jnp.float32
