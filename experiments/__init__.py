"""Experiments that check the paper's claims with the project's own code (see experiments/RESULTS.md: issue 21's channel sweep; RESULTS-learns.md: the f4c8 setting)."""
