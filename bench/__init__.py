"""prefbench's suite runner: CLI, config, the one evaluator, Ray glue (bench.ray_runner), results, report."""

__version__ = "0.1.0"
