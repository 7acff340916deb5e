"""Preference-optimization algorithms against one policy/reference interface (no Ray here)."""

from algorithms.registry import Registry

ALGORITHMS = Registry(
    kind="algorithm", group="prefbench.algorithms", package="algorithms", contract="algorithms.interface:contract_problems"
)
