"""One module per op. Each holds, in this order: its input checks, its NumPy reference (the
specification, a forward/backward pair `X_forward(ops, ...) -> (out, cache)`,
`X_backward(ops, dout, cache) -> grads`), its jitted loops (private `@kernel` functions that fill
preallocated arrays) and its Numba entry points (`X_forward_numba`), which check with the same
check, allocate, call a kernel, and fall back to the reference for inputs a kernel does not take
(empty arrays, in-place updates of non-contiguous arrays). `kernels/backends.py` binds them.

Inputs may be read-only (np.memmap(mode="r"), np.frombuffer, arrays with writeable=False),
strided or unaligned on every backend; only the arrays a kernel updates in place (KV caches,
AdamW's param, m and v, `out`, `dweight`) must be writeable. Caches have one layout on both
backends, so either backward accepts the other's forward cache, and both refuse the same bad ones.

NaN and infinity, the same on every backend:
- softmax, and the probabilities of attention: -inf is a masked entry and gets exactly 0; a row
  that is all -inf gives zeros (attention: a zero output and lse = -inf). A row holding a NaN
  or +inf gives a row of NaN (in attention: NaN at the keys it may attend to, 0 at the others).
- cross-entropy: a counted row holding a NaN or +inf gives a NaN loss and a NaN gradient row;
  an ignored row gives 0 and a zero gradient whatever it holds.
- everything else propagates NaN and inf as IEEE arithmetic does. A NaN or inf that meets a
  zero probability (a masked key's value, say) may make a product NaN on the reference (a
  matrix product computes 0 * NaN) and not on Numba (which skips masked keys): the rows and
  gradients that depend on a non-finite value are non-finite on both.
- a NaN or infinite attention scale, eps, learning rate or other setting is refused.

Shape letters: B batch, H heads, T query length, S key length, hs head size, C channels, V vocab,
N rows.
"""
