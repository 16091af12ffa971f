"""A plain PyTorch training loop on a dcae15 latent store: no dcae15 trainer, exact resume from the reader's state.

    python -m examples.plain_loop STORE_URL --steps 100 --ckpt loop.pt   # rerun: continues where it stopped
"""
import argparse
import os

import torch
from torch.utils.data import DataLoader

from examples.lightning_dit import lightning_dit_tiny
from storage.latent_store import LatentStore
from storage.reader import LatentStreamDataset


def train(store_url: str, steps: int, ckpt: str, batch_size: int = 16, num_workers: int = 0) -> list[list[int]]:
    """Train a flow-matching model to ``steps``; returns the dataset rows of each batch this call consumed."""
    store = LatentStore.open(store_url, read_only=True)
    (c, h, w), num_classes = store.latent_shape, int(store.attrs.get("num_classes") or store.labels().max() + 1)
    torch.manual_seed(0)
    model = lightning_dit_tiny(in_channels=c, input_size=(h, w), num_classes=num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ds = LatentStreamDataset(store_url, batch_size=batch_size, seed=0)  # one rank; pass rank/world_size under DDP
    step, gen = 0, torch.Generator().manual_seed(0)
    if os.path.exists(ckpt):  # resume: weights, optimizer, noise RNG and the reader's cursor
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        ds.load_state_dict(state["data"])
        step = state["step"]
    seen = []
    # batch_size=None: the dataset yields whole batches; `state` travels with each batch (works with workers too)
    for batch in DataLoader(ds, batch_size=None, num_workers=num_workers):
        if step >= steps:
            break
        x0, y = batch["latents"], batch["labels"]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.rand(x0.shape[0], generator=gen).view(-1, 1, 1, 1)
        x_t = (1 - t) * x0 + t * noise  # linear path: t=0 data, t=1 noise; the model learns the velocity
        loss = (model(x_t, t.flatten() * 1000, y) - (noise - x0)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        seen.append(batch["indices"].tolist())
        data_state = batch["state"]  # the reader's position after this batch
    if seen:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                    "data": data_state, "step": step}, ckpt)
    return seen


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--ckpt", default="plain_loop.pt")
    a = ap.parse_args()
    print(f"trained {len(train(a.store, a.steps, a.ckpt))} steps; state in {a.ckpt}")
