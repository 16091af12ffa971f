"""Evaluation: FID / IS / precision / recall (``fidelity``), cached reference statistics (``reference``), the demo's
proxy feature network (``proxy``), the results table (``results``) and reconstruction metrics (``image_quality``).

Submodules are imported on use, so ``import dcae15.metrics`` stays cheap.
"""

__all__ = ["fidelity", "inputs", "proxy", "reference", "results"]
