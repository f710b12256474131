"""Benchmarks behind ``cosmic-fx bench ...``: every figure is measured in the run that prints it."""
