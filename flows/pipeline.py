"""The whole recipe: images -> autoencoder -> one latent store -> for each backbone: train, sample, evaluate."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows import names
from flows.artifacts import publish_figures
from flows.autoencoder import train_autoencoder
from flows.common import ConfigArg, stage_config
from flows.diffusion import train_diffusion
from flows.encode import encode_latents
from flows.evaluate import (checkpoints_to_score, draw_run_figures, evaluate_autoencoder, evaluate_samples,
                            plot_results)
from flows.prepare import prepare_images
from flows.report import outputs_summary
from flows.sample import sample_run

__all__ = ["run_pipeline"]


@flow(name="run_pipeline", flow_run_name=names.pipeline_name)
def run_pipeline(root: str | None = None, config: ConfigArg = "demo", backbones: list[str] | None = None) -> dict[str, Any]:
    """Run every stage; each is cached (a rerun with the same inputs does nothing) and resumable (a killed run
    continues). ``backbones`` (preset names) overrides the config's list; they all train on the same store."""
    cfg = stage_config(root, config, **({"diffusion": {"backbones": list(backbones)}} if backbones else {}))
    conf = cfg.to_dict()
    log = get_run_logger()

    dataset = prepare_images(root=cfg.root, config=conf)
    ae = train_autoencoder(dataset=dataset["url"], root=cfg.root, config=conf)
    if cfg.evaluate.reconstruction:
        evaluate_autoencoder(ae=ae["url"], dataset=dataset["url"], root=cfg.root, config=conf)
    store = encode_latents(ae=ae["url"], dataset=dataset["url"], root=cfg.root, config=conf)
    for backbone in cfg.diffusion.backbones:
        run = train_diffusion(store=store["url"], backbone=backbone, root=cfg.root, config=conf)
        for step in checkpoints_to_score(run["url"], cfg.evaluate.checkpoints):  # several: the plot shows curves
            samples = sample_run(run=run["url"], root=cfg.root, config=conf, checkpoint=step)
            evaluate_samples(samples=samples["url"], dataset=dataset["url"], root=cfg.root, config=conf)
        draw_run_figures(root=cfg.root, run_url=run["url"], samples_url=samples["url"], dataset_url=dataset["url"],
                         classes=cfg.evaluate.grid_classes)
    plot_results(root=cfg.root)

    summary = outputs_summary(cfg.root)
    log.info("outputs under %s: %s", cfg.root, {k: v for k, v in summary.items() if k != "table"})
    create_markdown_artifact(key="dcae15-pipeline", markdown=f"# dcae15 pipeline\n\n```\n{summary.get('table', '')}\n```\n"
                             + "\n".join(f"- {k}: `{v}`" for k, v in summary.items() if k != "table"),
                             description="where the pipeline's outputs are")
    publish_figures(summary.get("figures", []))  # one link artifact per PNG
    return summary
