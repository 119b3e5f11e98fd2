"""Kernel micro-benchmarks at each preset's training shapes (see fastformer.bench.make_kernel_call)."""

import pytest
from conftest import run

from fastformer.cli import bench


@pytest.mark.parametrize("op", bench.KERNEL_OPS)
def test_kernel(benchmark, op, backend, preset):
    benchmark.group = f"kernel {op}"
    run(benchmark, bench.make_kernel_call(op, preset, backend), backend, preset)
    benchmark.extra_info["shapes"] = bench.kernel_shapes(preset)


@pytest.mark.parametrize("op", ["attention_forward", "attention_backward"])
@pytest.mark.parametrize("seq_len", [1024, 4096])
def test_long_attention(benchmark, op, backend, seq_len):
    """Attention at the medium preset's width over long rows, the step's tokens kept."""
    benchmark.group = f"kernel {op} T={seq_len}"
    run(benchmark, bench.make_kernel_call(op, "medium", backend, seq_len=seq_len), backend, "medium")
    benchmark.extra_info["shapes"] = bench.kernel_shapes("medium", seq_len)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("gemm", ["qkv", "ffn_in", "ffn_out", "head", "head_dweight"])
def test_gemm(benchmark, gemm, precision, preset):
    """A matrix product of the preset's step (bench.gemm_shapes) on the Numba backend: float32 on
    NumPy's BLAS, bfloat16 on fastformer's kernel (packing included); GFLOP/s in extra_info."""
    from fastformer.kernels.ops.gemm_bf16 import cpu_has_bf16

    if precision == "bf16" and not cpu_has_bf16():
        pytest.skip("this CPU has no AVX-512 BF16")
    benchmark.group = f"gemm {gemm} {preset}"
    median_s = run(benchmark, bench.make_gemm(preset, gemm, precision, backend="numba"), "numba", preset)
    M, K, N = bench.gemm_shapes(preset)[gemm]
    benchmark.extra_info["gflops_per_s"] = 2 * M * K * N / median_s / 1e9


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("gemm", ["qkv", "ffn_in", "ffn_out"])
def test_linear_backward(benchmark, gemm, precision, preset):
    """ops.linear_backward of a linear layer of the preset's step (bench.gemm_shapes), with a bias
    gradient, on the Numba backend: float32 on NumPy's BLAS, bfloat16 on fastformer's kernel."""
    from fastformer.kernels.ops.gemm_bf16 import cpu_has_bf16

    if precision == "bf16" and not cpu_has_bf16():
        pytest.skip("this CPU has no AVX-512 BF16")
    benchmark.group = f"linear_backward {gemm} {preset}"
    run(benchmark, bench.make_linear_backward(preset, gemm, precision, backend="numba"), "numba", preset)
