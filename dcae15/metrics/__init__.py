"""Evaluation: FID / IS / precision / recall (``fidelity``), cached reference statistics (``reference``), the demo's
proxy classifier (``proxy``), the results table (``results``) and reconstruction metrics (``image_quality``).

Imports run one way: ``extractor`` (the feature networks: InceptionV3 spec, the proxy's net and torch-fidelity
wrapper), ``labels`` (the one class-label rule), ``inputs`` and ``_io`` are leaves; ``reference`` and ``proxy`` build
on them, ``fidelity`` on ``reference``, ``recon_proxy`` on all. Submodules are imported on use, so
``import dcae15.metrics`` stays cheap.
"""

__all__ = ["extractor", "fidelity", "inputs", "labels", "proxy", "reference", "results"]
