"""Generation: sampling (temperature, top-k, top-p, repetition penalty) and greedy/beam search
over one contract every model implements, `step(tokens, state) -> logits`. Nothing here knows
which model it drives."""
