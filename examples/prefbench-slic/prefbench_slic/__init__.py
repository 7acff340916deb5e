"""prefbench-slic: an example plugin package for prefbench (see docs/plugins.md).

Nothing here registers itself: prefbench loads `prefbench_slic.slic:SLiC` and
`prefbench_slic.weather:ToyWeather` through the entry points declared in pyproject.toml.
"""
