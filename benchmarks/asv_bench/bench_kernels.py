"""Kernel micro-benchmarks at the medium preset's shapes: B=32, T=128, C=256, H=8, F=1024, V=4096,
and attention at long sequences (the same 4096 tokens a call as B x T = 4 x 1024 and 1 x 4096).
What each call's inputs are is in `fastformer.bench.make_kernel_call`."""

from fastformer.cli import bench

from .common import BACKENDS

PRESET = "medium"


class _Kernel:
    """One kernel's calls, built and run once (compiled) in setup; subclasses name them."""

    params = [BACKENDS]
    param_names = ["backend"]
    ops = {}  # benchmark suffix -> fastformer.bench kernel op

    def setup(self, backend):
        self.calls = {name: bench.make_kernel_call(op, PRESET, backend) for name, op in self.ops.items()}
        for call in self.calls.values():
            call()


class Softmax(_Kernel):
    ops = {"forward": "softmax_forward", "backward": "softmax_backward"}

    def time_forward(self, backend):
        self.calls["forward"]()

    def time_backward(self, backend):
        self.calls["backward"]()


class LayerNorm(_Kernel):
    ops = {"forward": "layernorm_forward", "backward": "layernorm_backward"}

    def time_forward(self, backend):
        self.calls["forward"]()

    def time_backward(self, backend):
        self.calls["backward"]()


class Attention(_Kernel):
    ops = {"forward": "attention_forward", "backward": "attention_backward"}

    def time_forward(self, backend):
        self.calls["forward"]()

    def time_backward(self, backend):
        self.calls["backward"]()


class LongAttention:
    """Causal self-attention from a fused QKV at T = 1024 and 4096 (the tiled form on Numba)."""

    params = [BACKENDS, [1024, 4096]]
    param_names = ["backend", "seq_len"]
    timeout = 300

    def setup(self, backend, seq_len):
        self.calls = {op: bench.make_kernel_call(op, PRESET, backend, seq_len=seq_len)
                      for op in ("attention_forward", "attention_backward")}
        for call in self.calls.values():
            call()

    def time_forward(self, backend, seq_len):
        self.calls["attention_forward"]()

    def time_backward(self, backend, seq_len):
        self.calls["attention_backward"]()


class LMHeadCrossEntropy(_Kernel):
    ops = {"forward_backward": "lm_head_cross_entropy"}

    def time_forward_backward(self, backend):
        self.calls["forward_backward"]()


class CrossEntropy(_Kernel):
    ops = {"forward_backward": "cross_entropy"}

    def time_forward_backward(self, backend):
        self.calls["forward_backward"]()


class Gelu(_Kernel):
    ops = {"forward": "gelu_forward", "backward": "gelu_backward"}

    def time_forward(self, backend):
        self.calls["forward"]()

    def time_backward(self, backend):
        self.calls["backward"]()


class AdamW(_Kernel):
    ops = {"update": "adamw_update"}

    def time_update(self, backend):
        self.calls["update"]()


class DecodeStep(_Kernel):
    ops = {"step": "decode_step"}

    def time_step(self, backend):
        self.calls["step"]()


class Gemm:
    """The matrix products of a medium step (bench.gemm_shapes) on the Numba backend, in float32
    (NumPy's BLAS) and bfloat16 (fastformer's kernel, packing included), as GFLOP/s."""

    params = (["qkv", "ffn_in", "ffn_out", "head", "head_dweight"], ["fp32", "bf16"])
    param_names = ["gemm", "precision"]

    def setup(self, gemm, precision):
        from fastformer.kernels.ops.gemm_bf16 import cpu_has_bf16

        if precision == "bf16" and not cpu_has_bf16():
            raise NotImplementedError("this CPU has no AVX-512 BF16")  # asv: skipped
        self.call = bench.make_gemm(PRESET, gemm, precision, backend="numba")
        self.call()

    def time_gemm(self, gemm, precision):
        self.call()

    def track_gflops(self, gemm, precision):
        from .common import calls_per_second

        M, K, N = bench.gemm_shapes(PRESET)[gemm]
        return 2 * M * K * N * calls_per_second(self.call) / 1e9

    track_gflops.unit = "GFLOP/s"


class LinearBackward:
    """The backward of a medium step's linear layers (bench.gemm_shapes: qkv, ffn_in, ffn_out) on
    the Numba backend, a bias gradient included: float32 on NumPy's BLAS, bfloat16 on fastformer's
    kernel with the output gradient packed for both products in one pass."""

    params = (["qkv", "ffn_in", "ffn_out"], ["fp32", "bf16"])
    param_names = ["gemm", "precision"]

    def setup(self, gemm, precision):
        from fastformer.kernels.ops.gemm_bf16 import cpu_has_bf16

        if precision == "bf16" and not cpu_has_bf16():
            raise NotImplementedError("this CPU has no AVX-512 BF16")  # asv: skipped
        self.call = bench.make_linear_backward(PRESET, gemm, precision, backend="numba")
        self.call()

    def time_linear_backward(self, gemm, precision):
        self.call()
