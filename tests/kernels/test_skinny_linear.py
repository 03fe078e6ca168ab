"""skinny_linear: every backend against the reference (F.linear in float32) within float32
rounding, and the property the decode loop relies on: each row's result is bitwise the same
whatever the other rows, so a verify over m tokens computes what m one-token forwards do."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

import eagle2_kernels as ek
from eagle2_kernels import reference
from kernel_helpers import DTYPES, backends_under_test

BACKENDS = backends_under_test("skinny_linear")
NATIVE = backends_under_test("skinny_linear", native=True)


@st.composite
def linear_inputs(draw):
    """(x [M, K], weight [N, K], bias [N] or None) in one dtype: K and N off the vector widths
    (16 float32 / 32 bfloat16 lanes, 8- and 4-row tiles), M across the register blocks."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    M = draw(st.integers(1, ek.SKINNY_LINEAR_MAX_ROWS))
    K = draw(st.sampled_from([1, 7, 16, 31, 33, 64, 100, 576]))
    N = draw(st.sampled_from([1, 5, 8, 13, 64, 200]))
    dtype = draw(st.sampled_from(DTYPES))
    x = torch.randn(M, K, generator=g).to(dtype)
    weight = torch.randn(N, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype) if draw(st.booleans()) else None
    return x, weight, bias


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: f"backend={b}")
@given(inputs=linear_inputs())
def test_matches_reference(backend, inputs):
    x, weight, bias = inputs
    want = reference.skinny_linear(x, weight, bias)
    got = ek.skinny_linear(x, weight, bias, backend=backend)
    assert got.dtype == x.dtype and got.shape == want.shape
    # float32 sums in another order: within K float32 roundings of the sum of magnitudes, plus
    # one rounding of the output dtype
    K = x.shape[1]
    bound = 4 * K * 2**-23 * (x.float().abs() @ weight.float().abs().T + (bias.float().abs() if bias is not None else 0))
    out_ulp = {torch.float32: 0.0, torch.float16: 2**-10, torch.bfloat16: 2**-7}[x.dtype]
    err = (got.float() - want.float()).abs()
    assert torch.all(err <= bound + 1e-30 + out_ulp * want.float().abs()), float(err.max())


@pytest.mark.parametrize("backend", NATIVE, ids=lambda b: f"backend={b}")
@given(inputs=linear_inputs(), data=st.data())
def test_each_row_is_computed_alike_whatever_the_other_rows(backend, inputs, data):
    x, weight, bias = inputs
    whole = ek.skinny_linear(x, weight, bias, backend=backend)
    i = data.draw(st.integers(0, x.shape[0] - 1))
    j = data.draw(st.integers(i + 1, x.shape[0]))
    assert torch.equal(ek.skinny_linear(x[i:j], weight, bias, backend=backend), whole[i:j])
    shuffled = torch.randperm(x.shape[0])
    assert torch.equal(ek.skinny_linear(x[shuffled], weight, bias, backend=backend), whole[shuffled])


@pytest.mark.parametrize("backend", NATIVE, ids=lambda b: f"backend={b}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_row_count_computes_the_one_row_result(backend, dtype):
    # the CPU kernel tiles 8 weight rows for some row counts and 4 for others (1-3, 8, 9 vs
    # the rest): the tiling must not show in any row
    g = torch.Generator().manual_seed(1)
    x, weight, bias = (torch.randn(s, generator=g).to(dtype) for s in ((16, 100), (203, 100), (203,)))
    one = torch.cat([ek.skinny_linear(x[i:i + 1], weight, bias, backend=backend) for i in range(16)])
    for m in range(2, 17):
        assert torch.equal(ek.skinny_linear(x[:m], weight, bias, backend=backend), one[:m]), m


@pytest.mark.parametrize("backend", NATIVE, ids=lambda b: f"backend={b}")
@pytest.mark.parametrize("rows", [1, 3, 16])  # 1 and 3 rows run threaded too (the weight stream)
def test_thread_count_does_not_change_results(backend, rows):
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(rows, 576, generator=g), torch.randn(4096, 576, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ek.skinny_linear(x, weight, backend=backend)
        torch.set_num_threads(max(2, threads))
        assert torch.equal(ek.skinny_linear(x, weight, backend=backend), one)
    finally:
        torch.set_num_threads(threads)


def test_leading_dims_and_out():
    g = torch.Generator().manual_seed(1)
    x, weight, bias = torch.randn(2, 3, 40, generator=g), torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    out = torch.empty(2, 3, 24)
    assert ek.skinny_linear(x, weight, bias, out=out) is out
    assert torch.equal(out, ek.skinny_linear(x.reshape(6, 40), weight, bias).reshape(2, 3, 24))


def test_float64_runs_on_the_reference():
    x, weight = torch.randn(3, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    assert torch.equal(ek.skinny_linear(x, weight), x @ weight.T)


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.randn(65, 8)), "x: expected at most 64 rows"),
    (dict(weight=torch.randn(5, 9)), r"weight: expected shape \[\*, 8\]"),
    (dict(weight=torch.randn(5, 8).double()), "weight: expected dtype torch.float32"),
    (dict(bias=torch.randn(4)), r"bias: expected shape \[5\]"),
    (dict(x=torch.randn(8, 3)[:, :2].T.contiguous().T), "x: expected a contiguous tensor"),
    (dict(x=torch.tensor(1.0)), "x: expected at least 1 dim"),
    (dict(x=torch.randn(2, 8).int()), "x: expected dtype"),
    (dict(out=torch.empty(2, 4)), r"out: expected shape \[2, 5\]"),
])
def test_bad_input_is_a_clear_error(bad, match):
    args = dict(x=torch.randn(2, 8), weight=torch.randn(5, 8), bias=None, out=None) | bad
    with pytest.raises(ValueError, match=match):
        ek.skinny_linear(args.pop("x"), args.pop("weight"), args.pop("bias"), **args)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: f"backend={b}")
@given(inputs=linear_inputs())
def test_plan_computes_the_op(backend, inputs):
    x, weight, bias = inputs
    plan = ek.SkinnyLinearPlan(weight, bias, backend=backend)
    assert torch.equal(plan(x), ek.skinny_linear(x, weight, bias, backend=backend))
    assert torch.equal(plan(x[None]), ek.skinny_linear(x[None], weight, bias, backend=backend))


def test_plan_sees_the_weights_as_they_are_now():
    g = torch.Generator().manual_seed(2)
    x, weight, bias = torch.randn(3, 40, generator=g), torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    plan = ek.SkinnyLinearPlan(weight, bias)
    weight.mul_(2)  # values changed in place show through
    bias.add_(1)
    assert torch.equal(plan(x), ek.skinny_linear(x, weight, bias))
    out = torch.empty(3, 24)
    assert plan(x, out=out) is out and torch.equal(out, ek.skinny_linear(x, weight, bias))
    bias.data = torch.randn(1, generator=g)  # replaced in place: the op's checks answer
    with pytest.raises(ValueError, match=r"bias: expected shape \[24\]"):
        plan(x)
    bias.data = torch.randn(24, generator=g).half()
    with pytest.raises(ValueError, match="bias: expected dtype torch.float32"):
        plan(x)
    weight.data, bias.data = weight.data.double(), bias.data.double()  # module.double(): so is x
    with pytest.raises(ValueError, match="weight: expected dtype torch.float32"):
        plan(x)
    assert torch.equal(plan(x.double()), ek.skinny_linear(x.double(), weight, bias))  # the reference's


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: f"backend={b}")
def test_empty_reduction_gives_the_bias(backend):
    x, weight, bias = torch.randn(3, 0), torch.randn(5, 0), torch.randn(5)
    assert torch.equal(ek.skinny_linear(x, weight, bias, backend=backend), bias.expand(3, 5))
    assert torch.equal(ek.SkinnyLinearPlan(weight, bias, backend=backend)(x), bias.expand(3, 5))


@pytest.mark.parametrize("x, match", [
    (torch.randn(65, 8), "x: expected at most 64 rows"),
    (torch.randn(2, 9), r"weight: expected shape \[\*, 9\]"),
    (torch.randn(8, 3)[:, :2].T.contiguous().T, "x: expected a contiguous tensor"),
    (torch.tensor(1.0), "x: expected at least 1 dim"),
    (torch.randn(2, 8).bfloat16(), "weight: expected dtype torch.bfloat16"),
    ([[1.0] * 8], "x: expected a torch.Tensor"),
])
def test_plan_bad_input_is_the_ops_error(x, match):
    plan = ek.SkinnyLinearPlan(torch.randn(5, 8))
    with pytest.raises(ValueError, match=match):
        plan(x)


@pytest.mark.parametrize("weight, bias, match", [
    (torch.randn(8), None, r"weight: expected 2 dims"),
    (torch.randn(5, 8).int(), None, "weight: expected dtype"),
    (torch.randn(5, 8), torch.randn(4), r"bias: expected shape \[5\]"),
    (torch.randn(5, 8), torch.randn(5).double(), "bias: expected dtype torch.float32"),
])
def test_plan_bad_weights_are_a_clear_error(weight, bias, match):
    with pytest.raises(ValueError, match=match):
        ek.SkinnyLinearPlan(weight, bias)


def test_bf16_dot_is_what_the_cpu_has():
    """skinny_linear_bf16_dot says whether the CPU kernel takes the AVX512-BF16 path: on Linux
    exactly when the CPU lists avx512_bf16 (with avx512f/bw/vl) and the CPU kernels are built."""
    import pathlib
    import platform

    got = ek.skinny_linear_bf16_dot()
    assert isinstance(got, bool)
    if ek.backends()["cpu"] != "available":
        assert got is False
        return
    if platform.machine().lower() not in ("x86_64", "amd64"):
        assert got is False  # the bfloat16 dot-product path is x86-64 code
        return
    info = pathlib.Path("/proc/cpuinfo")
    if not info.exists():
        pytest.skip("the CPU's flags are read from Linux's /proc/cpuinfo")
    flags = next(line for line in info.read_text().splitlines() if line.startswith("flags")).split()
    assert got == all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512_bf16"))
