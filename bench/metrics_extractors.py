"""Feature-extraction throughput: the demo's proxy classifier vs torch-fidelity's InceptionV3, same code path.

Both run through ``dcae15.metrics.fidelity.extract_features`` (torch-fidelity's DataLoader loop) on the same
32 px shapes images; Inception uses stand-in weights with the real keys (speed does not depend on the values).
Prints images/s for each and the ratio proxy / Inception, plus the proxy's training time and held-out accuracy.

    .venv/bin/python bench/metrics_extractors.py [--images 64] [--inception-images 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def _stand_in_inception(folder: Path) -> None:
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    from dcae15.metrics.fidelity import INCEPTION_WEIGHTS

    real_load, real_url = fe.FeatureExtractorInceptionV3.load_state_dict, fe.load_state_dict_from_url
    try:
        fe.load_state_dict_from_url = lambda *a, **k: {}
        fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, sd, *a, **k: None
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        fe.FeatureExtractorInceptionV3.load_state_dict, fe.load_state_dict_from_url = real_load, real_url
    torch.save(net.state_dict(), folder / INCEPTION_WEIGHTS)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--inception-images", type=int, default=16)
    p.add_argument("--per-class", type=int, default=300)
    args = p.parse_args()

    from dcae15.metrics.fidelity import extract_features, inception_extractor
    from dcae15.metrics.inputs import load_labelled_images
    from dcae15.metrics.proxy import ProxyConfig, proxy_extractor
    from storage.synthetic import make_shapes_dataset

    tmp = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
    url = make_shapes_dataset(str(tmp / "shapes"), num_classes=8, per_class=args.per_class, size=32, seed=0)
    t0 = time.perf_counter()
    proxy = proxy_extractor(url, ProxyConfig())
    print(f"proxy classifier: {8 * args.per_class} images, trained in {proxy.info['train_seconds']:.1f} s "
          f"(total with loading {time.perf_counter() - t0:.1f} s), held-out accuracy "
          f"{proxy.info['held_out_accuracy']:.3f} on {proxy.info['num_held_out']} images")
    x = load_labelled_images(url, resolution=None)[0]
    _stand_in_inception(tmp)
    inception = inception_extractor(tmp)

    def rate(spec, n):
        net = spec.build([spec.layers["fid"]], "cpu")
        extract_features(x[:4], spec, device="cpu", feature_net=net)  # warm-up
        t = time.perf_counter()
        extract_features(x[:n], spec, device="cpu", feature_net=net)
        return n / (time.perf_counter() - t)

    r_proxy = rate(proxy, args.images)
    r_inc = rate(inception, args.inception_images)
    print(f"proxy extractor:     {r_proxy:8.1f} images/s ({args.images} images, 32 px)")
    print(f"Inception extractor: {r_inc:8.1f} images/s ({args.inception_images} images, resized to 299 px)")
    print(f"ratio proxy/Inception: {r_proxy / r_inc:.1f}x")


if __name__ == "__main__":
    main()
