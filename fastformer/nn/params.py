"""Parameters and gradients kept in two flat buffers, with one named view per tensor.

A model's weights live in `FlatParams.data` and its gradients in `FlatParams.grad`, both 1-D and
of one layout; `params[name]` and `grads[name]` are views into them. The optimizer updates the
whole buffer with one kernel call, and data-parallel training reduces one buffer instead of a
tensor per parameter. Tensors that take weight decay are laid out first, so the decayed part is
the slice `data[:n_decay]`.
"""

import numpy as np

from fastformer import seeds
from fastformer.errors import FastformerError
from fastformer.kernels import get_ops
from fastformer.kernels.checks import aligned_zeros


class FlatParams:
    """Named views into one flat parameter buffer and one flat gradient buffer.

    Args:
        shapes: {name: shape} in the order to lay them out (decayed tensors are moved first,
            keeping the given order within each group).
        decay: names of the tensors that take weight decay.
        dtype: float32 or float64.
    """

    def __init__(self, shapes, decay, dtype=np.float32):
        names = [n for n in shapes if n in decay] + [n for n in shapes if n not in decay]
        self.shapes = {n: tuple(shapes[n]) for n in names}
        self.dtype = np.dtype(dtype)
        sizes = [int(np.prod(s)) for s in self.shapes.values()]
        self.offsets = dict(zip(names, np.cumsum([0] + sizes[:-1]).tolist()))
        self.n_decay = sum(sz for n, sz in zip(names, sizes) if n in decay)
        self.data = aligned_zeros(sum(sizes), self.dtype)
        self.grad = aligned_zeros(sum(sizes), self.dtype)
        self.params = self._views(self.data)
        self.grads = self._views(self.grad)

    def _views(self, flat):
        return {n: flat[o:o + int(np.prod(s))].reshape(s)
                for (n, s), o in zip(self.shapes.items(), self.offsets.values())}

    @property
    def size(self):
        return self.data.size

    def load(self, state):
        """Copy `state` ({name: array}) into the parameters: every name once, shapes exact."""
        missing = [n for n in self.shapes if n not in state]
        extra = [n for n in state if n not in self.shapes]
        if missing or extra:
            raise FastformerError(f"state dict does not match the model: missing keys {missing}, "
                             f"unexpected keys {extra}")
        for n, arr in state.items():
            arr = np.asarray(arr)
            if arr.shape != self.shapes[n]:
                raise FastformerError(f"state dict entry {n!r} has shape {arr.shape}, the model "
                                 f"expects {self.shapes[n]}")
            if arr.dtype.kind != "f":
                raise FastformerError(f"state dict entry {n!r} must be a float array, got dtype {arr.dtype}")
        for n, arr in state.items():
            self.params[n][...] = arr


class FlatModel:
    """What every fastformer model shares through its `self.flat` (a FlatParams), and the weight
    format of its inference (`quantize`)."""

    weight_format = "fp32"  # the weights inference multiplies by: fp32, bf16 or int8 (model.quantize)
    quantized = None  # {key of `decoding_matrices`: QuantizedWeight}, None for fp32

    def _setup(self, shapes, decay, dtype, seed):
        """Lay out the parameters, seed the dropout generator `self.rng` (saved with
        checkpoints) and initialise the weights with `self._init_weights(rng)`."""
        if np.dtype(dtype) not in (np.float32, np.float64):
            raise FastformerError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")
        self.flat = FlatParams(shapes, decay, dtype)
        self.params, self.grads = self.flat.params, self.flat.grads
        init_rng, self.rng = seeds.model_streams(seed)
        self._init_weights(init_rng)

    def state_dict(self):
        """{name: array} of every parameter (views of the live weights)."""
        return dict(self.flat.params)

    def load_state_dict(self, state):
        """Copy weights in; a missing or extra key or a wrong shape raises ValueError. Quantised
        weights are made again from the new ones."""
        self.flat.load(state)
        if self.quantized is not None:
            self.quantize(self.weight_format)

    def decoding_matrices(self):
        """{key: (n_in, n_out) float32 view} of the matrices inference multiplies by: the model's
        blocks' and head's `matrices`."""
        raise NotImplementedError

    def quantize(self, weight_format):
        """Run inference -- decoding, `forward`, `loss` -- with the matrices of `decoding_matrices`
        in `weight_format`: "fp32" (the parameters themselves), "bf16" or "int8", quantised now,
        once, from the float32 parameters, which stay as they are ("fp32" goes back to them). The
        kernel backend refuses a format the CPU cannot run. A quantised model does not train.
        Returns the model."""
        ops = get_ops()
        ops.require_weight_format(weight_format)
        if weight_format != "fp32" and self.flat.dtype != np.float32:
            raise FastformerError(f"weight format {weight_format} quantises a float32 model, this one is "
                                  f"{self.flat.dtype}: use fp32")
        self.quantized = None if weight_format == "fp32" else {
            k: ops.quantize_weight(w, weight_format) for k, w in self.decoding_matrices().items()}
        self.weight_format = weight_format
        return self

    def check_trainable(self):
        """Refuse, in one line, to train a model whose inference weights are quantised."""
        if self.weight_format != "fp32":
            raise FastformerError(f"this model's weights are quantised to {self.weight_format} for inference and "
                                  f"do not train: call model.quantize('fp32') first")

    def num_parameters(self):
        return self.flat.size
