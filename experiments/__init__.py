"""Experiments that check the paper's claims with the project's own code (see experiments/RESULTS.md)."""
