"""Root conftest: the suite runs the plugin as installed (entry point pytest11), nothing is registered here.

Settings for this repository's own runs (offline, cpu, batching checks) live in pyproject.toml.
"""
