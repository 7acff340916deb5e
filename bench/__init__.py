"""prefbench's suite runner: CLI, config, the one evaluator, Ray glue (bench.ray_runner), results, report."""

__version__ = "0.1.0"


def say(msg: str) -> None:
    """A progress line for the user, on stderr (stdout stays clean for data)."""
    import sys

    print(msg, file=sys.stderr, flush=True)
