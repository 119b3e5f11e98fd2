"""The two backends of the kernel interface: which function of each op module each one runs.

`NumpyOps` binds every op's NumPy reference: the specification, readable in the op's own module
(fastformer/kernels/ops/), and the fallback. `NumbaOps` binds the Numba entry points beside them
and inherits the rest. Every function takes the backend object first (`ops`), so an op built on
others -- the fused LM head and the tiled attention on `ops.matmul`, the GPT-2 decoding step on
`ops.attention_cached` -- runs on the backend that called it. Models and the trainer never see
these classes: they call `fastformer.kernels.get_ops()`.
"""

from fastformer.kernels._jit import numba
from fastformer.kernels.ops import (
    activations,
    adamw,
    attention,
    attention_cached,
    cross_entropy,
    embedding,
    gemm_bf16,
    gpt2_decode,
    layernorm,
    matmul,
    quantized,
    sampling,
    softmax,
)


class NumpyOps:
    """The reference kernels (pure NumPy, GEMMs on NumPy's BLAS)."""

    name = "numpy"
    matmul_precisions = {"float32": ("float32", "bfloat16"), "float64": ("float64",)}  # what `precision=` may ask
    # whether gpt2_decode_prompt runs a prompt in one pass over the weights; the reference runs
    # one gpt2_decode_step per position, slower than a model's forward over the whole prompt
    prompt_in_one_pass = False

    linear_forward = matmul.linear_forward
    linear_backward = matmul.linear_backward
    linear_gelu_forward = matmul.linear_gelu_forward
    pack = matmul.pack
    require_precision = matmul.require_precision
    matmul = matmul.matmul  # last: the name is the method's from here on
    softmax_forward = softmax.softmax_forward
    softmax_backward = softmax.softmax_backward
    layernorm_forward = layernorm.layernorm_forward
    layernorm_backward = layernorm.layernorm_backward
    residual_layernorm_forward = layernorm.residual_layernorm_forward
    residual_layernorm_backward = layernorm.residual_layernorm_backward
    attention_forward = attention.attention_forward
    attention_backward = attention.attention_backward
    attention_qkv_forward = attention.attention_qkv_forward
    attention_qkv_backward = attention.attention_qkv_backward
    attention_cached = attention_cached.attention_cached
    cross_entropy_forward = cross_entropy.cross_entropy_forward
    cross_entropy_backward = cross_entropy.cross_entropy_backward
    linear_cross_entropy_forward = cross_entropy.linear_cross_entropy_forward
    linear_cross_entropy_backward = cross_entropy.linear_cross_entropy_backward
    gelu_forward = activations.gelu_forward
    gelu_backward = activations.gelu_backward
    relu_forward = activations.relu_forward
    relu_backward = activations.relu_backward
    embedding_forward = embedding.embedding_forward
    embedding_backward = embedding.embedding_backward
    adamw_update = adamw.adamw_update
    gpt2_decode_step = gpt2_decode.gpt2_decode_step
    gpt2_decode_greedy = gpt2_decode.gpt2_decode_greedy
    gpt2_decode_sampled = gpt2_decode.gpt2_decode_sampled
    gpt2_decode_prompt = gpt2_decode.gpt2_decode_prompt
    quantize_weight = quantized.quantize_weight
    linear_quantized = quantized.linear_quantized
    require_weight_format = quantized.require_weight_format
    sample_ids = sampling.sample_ids


class NumbaOps(NumpyOps):
    """The jitted, fused and parallel kernels; the same signatures and results. What is not
    bound here (the backwards that return what the forward already made) is the reference's."""

    name = "numba"
    prompt_in_one_pass = True

    def __init__(self):
        if numba is None:
            raise ImportError("No module named 'numba'")
        bf16 = ("bfloat16",) if gemm_bf16.cpu_has_bf16() else ()  # nothing of it is compiled otherwise
        self.matmul_precisions = {"float32": ("float32", *bf16), "float64": ("float64",)}

    linear_forward = matmul.linear_forward_numba
    linear_backward = matmul.linear_backward_numba
    linear_gelu_forward = matmul.linear_gelu_forward_numba
    pack = matmul.pack_numba
    matmul = matmul.matmul_numba  # last: the name is the method's from here on

    softmax_forward = softmax.softmax_forward_numba
    softmax_backward = softmax.softmax_backward_numba
    layernorm_forward = layernorm.layernorm_forward_numba
    layernorm_backward = layernorm.layernorm_backward_numba
    residual_layernorm_forward = layernorm.residual_layernorm_forward_numba
    residual_layernorm_backward = layernorm.residual_layernorm_backward_numba
    attention_forward = attention.attention_forward_numba
    attention_backward = attention.attention_backward_numba
    attention_qkv_forward = attention.attention_qkv_forward_numba
    attention_qkv_backward = attention.attention_qkv_backward_numba
    attention_cached = attention_cached.attention_cached_numba
    cross_entropy_forward = cross_entropy.cross_entropy_forward_numba
    linear_cross_entropy_forward = cross_entropy.linear_cross_entropy_forward_numba
    gelu_forward = activations.gelu_forward_numba
    gelu_backward = activations.gelu_backward_numba
    relu_forward = activations.relu_forward_numba
    relu_backward = activations.relu_backward_numba
    embedding_forward = embedding.embedding_forward_numba
    embedding_backward = embedding.embedding_backward_numba
    adamw_update = adamw.adamw_update_numba
    gpt2_decode_step = gpt2_decode.gpt2_decode_step_numba
    gpt2_decode_greedy = gpt2_decode.gpt2_decode_greedy_numba
    gpt2_decode_sampled = gpt2_decode.gpt2_decode_sampled_numba
    gpt2_decode_prompt = gpt2_decode.gpt2_decode_prompt_numba
    linear_quantized = quantized.linear_quantized_numba
    require_weight_format = quantized.require_weight_format_numba
    sample_ids = sampling.sample_ids_numba
