"""asv benchmarks of fastformer: training steps, generation and kernels (see asv.conf.json)."""
