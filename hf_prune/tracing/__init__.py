"""Dependency groups traced from the computation graph, for models without an architecture adapter."""
