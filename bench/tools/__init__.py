"""prefbench's tools beside the run path: `prefbench perf` (perf.py), the GPU check (gpu_check.py), the
determinism check (determinism.py), and what they share (common.py). They prepare envs through
bench.run.prepare like a run does; nothing on the run path imports them."""
