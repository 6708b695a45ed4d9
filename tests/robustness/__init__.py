"""Robustness suite: bad inputs, fuzzing, fault injection, determinism and memory over long suites."""
