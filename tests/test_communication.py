"""benchmarks.communication: the collectives read from a compiled data-parallel train step, and
the step-time model built on them."""

# ruff: noqa: E501
# (the HLO text below keeps a compiled program's one-instruction-per-line form)
import math

import pytest

from benchmarks import communication as comm

HLO = """HloModule step

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%cond (p: (s32[], f32[3,3,8])) -> pred[] {
  %p = (s32[], f32[3,3,8]{2,1,0}) parameter(0)
  ROOT %lt = pred[] constant(true)
}

%body (p: (s32[], f32[3,3,8])) -> (s32[], f32[3,3,8]) {
  %p = (s32[], f32[3,3,8]{2,1,0}) parameter(0)
  %x = f32[3,3,8]{2,1,0} get-tuple-element(%p), index=1
  %g = (f32[8,3,3]{2,1,0}, f32[], /*index=2*/f32[8]{0}) all-reduce(%x, %y, %z), channel_id=1, to_apply=%add, metadata={op_name="jit(step)/while/body/transpose(jvp())/conv_general_dilated"}
  %s = f32[1,8]{1,0} all-reduce(%x), channel_id=2, to_apply=%add, metadata={op_name="jit(step)/while/body/jvp()/dot_general"}
  ROOT %t = (s32[], f32[3,3,8]{2,1,0}) tuple(%i, %x)
}

%prefix (p: (s32[], f32[3,3,8])) -> (s32[], f32[3,3,8]) {
  %p = (s32[], f32[3,3,8]{2,1,0}) parameter(0)
  %s = f32[1,8]{1,0} all-reduce(%x), channel_id=3, to_apply=%add, metadata={op_name="jit(step)/while/body/dot_general"}
  ROOT %t = (s32[], f32[3,3,8]{2,1,0}) tuple(%i, %x)
}

ENTRY %main (w: f32[3,3,8]) -> f32[3,3,8] {
  %w = f32[3,3,8]{2,1,0} parameter(0)
  %loop = (s32[], f32[3,3,8]{2,1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  %dynamic = (s32[], f32[3,3,8]{2,1,0}) while(%init), condition=%cond, body=%prefix
  %gathered = bf16[16]{0} all-gather(%v), channel_id=4, replica_groups={{0,1}}, dimensions={0}
  ROOT %out = f32[3,3,8]{2,1,0} get-tuple-element(%loop), index=1
}
"""


def test_collectives_run_their_loops_trip_count_times_and_name_their_bytes_and_phase():
  found = comm.collectives(HLO, unknown_trip_count=1.5)
  by_channel = {(c["kind"], c["computation"], c["bytes"]): c for c in found}
  assert len(found) == 4
  gradient = by_channel[("all-reduce", "body", 4 * (72 + 1 + 8))]
  assert gradient["phase"] == "backward" and gradient["executions"] == 4
  assert by_channel[("all-reduce", "body", 32)]["phase"] == "forward"
  assert by_channel[("all-reduce", "prefix", 32)]["executions"] == 1.5
  assert by_channel[("all-gather", "main", 32)]["executions"] == 1
  # a kernel [3, 3, 8] is found in the transposed [8, 3, 3] operand, 4 times per call
  reductions = comm.gradient_reductions(found, [(3, 3, 8)])
  assert reductions["per_kernel_min"] == reductions["per_kernel_max"] == 4


def test_a_predicted_row_is_the_stated_model_worked_by_hand():
  hardware = comm.Hardware(
    "test", {"float32": 100e12}, ((8, 100e9, 10e-6), (1 << 20, 50e9, 20e-6)), ""
  )
  record = {
    "compute_dtype": "float32",
    "flops_per_device": 3.5e12,
    "updates_per_batch": 4,
    "collectives": [
      {"kind": "all-reduce", "phase": "forward", "bytes": 1024, "executions": 24},
      {"kind": "all-reduce", "phase": "backward", "bytes": 40e6, "executions": 8},
    ],
  }
  row = comm.predict(record, hardware, 64, mfu=0.5)
  compute = 3.5e12 / (100e12 * 0.5)  # 70 ms
  ring = 2 * 63 / 64
  forward = 24 * (20e-6 + ring * 1024 / 50e9)
  backward = 8 * (20e-6 + ring * 40e6 / 50e9)
  assert row["compute_s"] == pytest.approx(compute)
  assert row["as_compiled"]["step_s"] == pytest.approx(compute + forward + backward)
  assert row["as_compiled"]["efficiency"] == pytest.approx(compute / (compute + forward + backward))
  bf16 = 8 * (20e-6 + ring * 20e6 / 50e9)
  assert row["bf16"]["step_s"] == pytest.approx(compute + forward + bf16)
  fused = 4 * 20e-6 + ring * 8 * 40e6 / 50e9
  assert row["fused"]["step_s"] == pytest.approx(compute + forward + fused)
  assert row["overlap"]["step_s"] == pytest.approx(compute + forward + max(0, backward - compute))
  all_three = max(0, 4 * 20e-6 + ring * 8 * 20e6 / 50e9 - compute)
  assert row["all"]["step_s"] == pytest.approx(compute + forward + all_three)
  with pytest.raises(ValueError, match="n=2000000 accelerators is not allowed"):
    hardware.link(2_000_000)


def test_the_online_step_reduces_every_kernel_gradient_T_times_per_batch():
  """The compiled data-parallel step of the training program, on a tiny network and 2 devices:
  the online rule all-reduces each kernel's gradient once per time step, T per batch; BPTT once."""
  online = comm.measure(comm.SMOKE_CASE, "online", devices=2)
  steps = online["time_steps"]
  assert steps > 1
  assert online["gradient_reductions"]["per_kernel_min"] == steps
  assert online["gradient_reductions"]["per_kernel_max"] == steps
  backward = [c for c in online["collectives"] if c["phase"] == "backward"]
  moved = sum(c["bytes"] * c["executions"] for c in backward)
  assert moved >= steps * online["gradient_bytes"]
  # the trip count read from the rolled loop agrees with the unrolled program's collectives
  unrolled = online["unrolled_collectives"]
  executions = sum(c["executions"] for c in online["collectives"])
  assert unrolled["bytes"] == pytest.approx(
    sum(c["bytes"] * c["executions"] for c in online["collectives"]), rel=1e-3
  )
  assert unrolled["executions"] == pytest.approx(executions, rel=0.1)
  bptt = comm.measure(comm.SMOKE_CASE, "bptt", devices=2)
  assert bptt["gradient_reductions"]["per_kernel_min"] == 1
  assert bptt["gradient_reductions"]["per_kernel_max"] == 1
  assert math.isclose(online["flops_per_device"], bptt["flops_per_device"], rel_tol=0.5)


def test_bad_arguments_name_the_value_and_what_is_allowed(capsys):
  for argv, message in (
    (["--cases=nope"], "--cases value 'nope' is not allowed; allowed: resnet18_cifar10_binary"),
    (["--modes=online,tbptt"], "--modes value 'tbptt' is not allowed; allowed: online"),
    (["--devices=1"], "--devices=1 is not allowed; allowed: 2 or more"),
    (["--mfu=0"], "--mfu=0.0 is not allowed"),
  ):
    with pytest.raises(SystemExit):
      comm.main(argv)
    assert message in capsys.readouterr().err


def test_records_are_predicted_again_and_plotted_without_compiling(tmp_path, capsys):
  import json

  record = {
    "case": comm.SMOKE_CASE,
    "mode": "online",
    "compute_dtype": "float32",
    "flops_per_device": 1e12,
    "updates_per_batch": 4,
    "gradient_reductions": {"kernels": 1, "per_kernel_min": 4.0, "per_kernel_max": 4.0},
    "collectives": [
      {"kind": "all-reduce", "phase": "forward", "bytes": 512, "executions": 8},
      {"kind": "all-reduce", "phase": "backward", "bytes": 1e6, "executions": 4},
    ],
  }
  path = tmp_path / "communication.json"
  path.write_text(json.dumps({"mfu": 0.35, "records": [record]}))
  plot = tmp_path / "efficiency.png"
  comm.main([f"--records={path}", "--mfu=0.5", f"--plot={plot}"])
  printed = capsys.readouterr().out
  row = comm.predict(record, comm.HARDWARE["h100"], 64, 0.5)
  assert f"{row['as_compiled']['efficiency']:.0%} → {row['all']['efficiency']:.0%}" in printed
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
