"""Run several ``python -m dcae15.ae.train`` command lines in one torchrun launch (a launch costs ~10-15 s on 2
cores): argv[1] is a JSON list of argument lists, run in order. The process group is made once here; the trainer
uses it and leaves it in place."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from dcae15.ae.train import main as train_main


def main() -> None:
    runs = json.loads(sys.argv[1])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    try:
        for argv in runs:
            train_main(argv)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
