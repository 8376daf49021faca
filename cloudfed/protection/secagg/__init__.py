"""Secure aggregation (Bonawitz et al. 2017, SecAgg+ Bell et al. 2020) as pure functions."""
