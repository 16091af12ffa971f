"""Prefect flows over storage/ and dcae15/; the ``dcae15`` command is ``flows.cli``.

Floors (each imports only the ones above it): helpers (config, env, launch, gpu, forksafe, report) -> shared wiring
(common, names, caching, artifacts, events, pointers, rerun) -> one module per stage (prepare, autoencoder, encode,
diffusion, sample, evaluate), which never import each other -> compositions (pipeline: ``run_pipeline``;
score_checkpoints: ``evaluate_checkpoint``, ``evaluate_new_checkpoints``) -> cli. A flow's name is never its
module's name: ``from flows.sample import sample_run``.

Nothing is imported here, so ``flows.cli`` can set Prefect's environment before Prefect is imported.
"""
