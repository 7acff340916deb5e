"""prefbench's suite runner: CLI, config, the one evaluator, Ray glue (bench.run.ray_runner), results, report."""

__version__ = "0.1.0"
# the packages whose versions a run records (OUT/versions.json)
RUN_PACKAGES = ("torch", "ray", "deepspeed", "transformers", "tokenizers", "datasets", "pandas", "vaderSentiment")


def say(msg: str) -> None:
    """A progress line for the user, on stderr (stdout stays clean for data)."""
    import sys

    print(msg, file=sys.stderr, flush=True)


def package_versions(names: tuple[str, ...] = RUN_PACKAGES) -> dict[str, str]:
    """Python's, prefbench's and each package's installed version ("not installed" where it is not):
    a run's versions.json, and the headers of perf and the GPU and determinism checks."""
    import sys
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "prefbench": __version__}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
