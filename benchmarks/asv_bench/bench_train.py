"""Full training steps (forward, backward, AdamW) of the LM presets, each on a batch of its
train.batch_size x train.seq_len (32 x 128)."""

from fastformer.cli import bench

from .common import BACKENDS, PRESETS, calls_per_second


class TrainStep:
    params = (BACKENDS, PRESETS)
    param_names = ["backend", "preset"]
    number = 1  # one step per sample: a NumPy step on medium takes seconds
    repeat = (1, 10, 20.0)  # at least 1 sample, at most 10, stop adding after 20 s
    warmup_time = 0.0  # setup already ran a step (kernel compile or cache load)
    timeout = 600

    def setup(self, backend, preset):
        self.model, self.step = bench.make_train_step(preset, backend)
        self.step()

    def time_train_step(self, backend, preset):
        self.step()

    def peakmem_train_step(self, backend, preset):
        self.step()

    def track_steps_per_sec(self, backend, preset):
        return calls_per_second(self.step)

    track_steps_per_sec.unit = "steps/s"

    def track_tokens_per_sec(self, backend, preset):
        B, T = bench.batch_shape(preset)
        return B * T * calls_per_second(self.step)

    track_tokens_per_sec.unit = "tokens/s"


class TrainStepBF16:
    """The step of TrainStep with train.precision=bf16 (bfloat16 products) on the Numba backend;
    skipped on a CPU without AVX-512 BF16."""

    params = (PRESETS,)
    param_names = ["preset"]
    number = 1
    repeat = (1, 10, 20.0)
    warmup_time = 0.0
    timeout = 600

    def setup(self, preset):
        from fastformer.kernels.ops.gemm_bf16 import cpu_has_bf16

        if not cpu_has_bf16():
            raise NotImplementedError("this CPU has no AVX-512 BF16")  # asv: skipped
        self.model, self.step = bench.make_train_step(preset, "numba", precision="bf16")
        self.step()

    def time_train_step(self, preset):
        self.step()

    def track_steps_per_sec(self, preset):
        return calls_per_second(self.step)

    track_steps_per_sec.unit = "steps/s"
