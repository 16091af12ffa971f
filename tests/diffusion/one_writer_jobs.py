"""One job of the one-writer tests, run as its own process: argv[1] is JSON {"job": "train" | "sample", ...}; the
result is printed as the last line, ``RESULT <json>``."""

from __future__ import annotations

import json
import sys
import time

import torch


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    if spec.get("pause_at"):  # hold still once the checkpoint of that step is committed: the test kills us there
        from storage.rundir import RunDir

        publish = RunDir.publish

        def publish_then_pause(self, step, metrics):
            publish(self, step, metrics)
            if step == spec["pause_at"]:
                print(f"paused at step {step}", flush=True)
                time.sleep(3600)

        RunDir.publish = publish_then_pause
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
