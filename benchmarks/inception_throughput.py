"""Images/s of the offline FID Inception (``fid_inception``) on this machine, printed as one JSON object.

For each torch thread count: the network alone on 299x299 inputs (``network_img_s``) and the whole clean-fid
path from small images in [-1, 1] (PIL-bicubic resize to 299 in float, then the network; ``end_to_end_img_s``).

    .venv/bin/python benchmarks/inception_throughput.py --threads 1,2 --images 32
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    ap.add_argument("--images", type=int, default=32, help="images per measurement")
    ap.add_argument("--resolution", type=int, default=28, help="input resolution for the end-to-end path")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from sida_core.metrics.inception import inception_feature_space

    t0 = time.perf_counter()
    space = inception_feature_space(device=args.device, batch_size=args.batch)
    load_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    small = torch.rand(args.images, 3, args.resolution, args.resolution, generator=g) * 2 - 1
    big = torch.rand(args.images, 3, 299, 299, generator=g) * 255
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        space.extractor(big[:2])  # warm-up
        t = time.perf_counter()
        for i in range(0, args.images, args.batch):
            space.extractor(big[i:i + args.batch])
        net = args.images / (time.perf_counter() - t)
        t = time.perf_counter()
        space.features(small, args.device)
        e2e = args.images / (time.perf_counter() - t)
        rows.append(dict(threads=threads, network_img_s=round(net, 2), end_to_end_img_s=round(e2e, 2)))
    print(json.dumps(dict(extractor_id=space.extractor_id, device=args.device, images=args.images,
                          batch=args.batch, load_and_verify_s=round(load_s, 2), cpu_count=os.cpu_count(),
                          loadavg_1min=round(os.getloadavg()[0], 2), results=rows)))


if __name__ == "__main__":
    main()
