"""Environments: prompts, an SFT policy (the reference), preference pairs, a gold reward."""

from algorithms.registry import Registry

ENVS = Registry(kind="env", group="prefbench.envs", package="envs", contract="envs.base:contract_problems")
