"""Generation through the public API: batch 1, greedy, 128 new tokens after a 16-token prompt."""

from fastformer import use_backend
from fastformer.cli import bench

from .common import BACKENDS, PRESETS, calls_per_second


class Generate:
    params = (BACKENDS, PRESETS)
    param_names = ["backend", "preset"]
    number = 1
    repeat = (1, 10, 20.0)
    warmup_time = 0.0
    timeout = 600

    def setup(self, backend, preset):
        self.model, prompt, self.gen = bench.make_generate(preset, backend)
        with use_backend(backend):  # compile or load every kernel the decode path uses
            self.model.generate(prompt, 4)

    def time_generate(self, backend, preset):
        self.gen()

    def track_tokens_per_sec(self, backend, preset):
        return bench.GEN_NEW * calls_per_second(self.gen, max_calls=5)

    track_tokens_per_sec.unit = "tokens/s"


class GenerateWeights:
    """The same on the Numba backend with the model's weights in each format (model.quantize);
    a format this CPU cannot run is skipped (NotImplementedError, as asv skips)."""
    params = (PRESETS, ["fp32", "bf16", "int8"])
    param_names = ["preset", "weights"]
    number = 1
    repeat = (1, 10, 20.0)
    warmup_time = 0.0
    timeout = 600

    def setup(self, preset, weights):
        from fastformer.kernels.ops.quantized import format_runs_natively

        if not format_runs_natively(weights):
            raise NotImplementedError(f"this CPU cannot run {weights} weights")
        self.model, prompt, self.gen = bench.make_generate(preset, "numba", weights=weights)
        with use_backend("numba"):
            self.model.generate(prompt, 4)

    def time_generate(self, preset, weights):
        self.gen()

    def track_tokens_per_sec(self, preset, weights):
        return bench.GEN_NEW * calls_per_second(self.gen, max_calls=5)

    track_tokens_per_sec.unit = "tokens/s"
