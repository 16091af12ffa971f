"""One job of the one-writer tests, run as its own process: argv[1] is JSON {"job": "train" | "sample", ...}; the
result is printed as the last line, ``RESULT <json>``."""

from __future__ import annotations

import json
import sys

import torch


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    print("started", flush=True)
    if spec["job"] == "train":
        from dcae15.diffusion.train import DiffusionTrainConfig, train_diffusion

        out = train_diffusion(DiffusionTrainConfig.from_dict(spec["cfg"]), spec["store"], spec["run"])
    else:
        from dcae15.diffusion.sample import sample_to_store

        out = sample_to_store(spec["run"], spec["out"], **spec["kw"])
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
