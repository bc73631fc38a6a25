"""Extraction speed: ``extract_descriptors`` against a reference loop that decodes,
resizes and forwards one image at a time, as the authors' PyTorch code does.

On the photos in ``$SFMPAIRS_DATA/colmap/*/images`` (about 240) with resnet18 (random
weights: speed does not depend on them) and GeM at image size 362, in one run. Prints
images per second of both, their ratio and the largest descriptor difference.

Target (issue 4): >= 2x the reference's images per second on 2 CPU cores, descriptors
equal within 1e-4 (batches hold images of equal size, so batching changes no input).

    python benchmarks/bench_extract.py [--device cpu|cuda] [--image-size 362]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SFMPAIRS_DATA", REPO.parent / "shared" / "data"))


def reference(net, root: Path, names, image_size: int, device) -> np.ndarray:
    """One image at a time: decode, resize, normalise, forward (cirtorch's way)."""
    from sfmpairs.train.data import load_image

    net = net.to(device).eval().to(memory_format=torch.contiguous_format)
    out = []
    with torch.no_grad():
        for n in names:
            x = net.normalise_input(load_image(root / n, image_size)[None].to(device))
            out.append(net(x).cpu().numpy()[0])
    return np.stack(out)


def main() -> None:
    from sfmpairs.train.extract import extract_descriptors
    from sfmpairs.train.network import build_network

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--image-size", type=int, default=362)
    ap.add_argument("--arch", default="resnet18")
    args = ap.parse_args()
    root = DATA / "colmap"
    names = sorted(str(p.relative_to(root)) for p in root.glob("*/images/*") if p.suffix.lower() in (".jpg", ".png"))
    if not names:
        raise SystemExit(f"no photos under {root}/*/images (set SFMPAIRS_DATA)")
    torch.manual_seed(0)
    net = build_network({"arch": args.arch, "pool": "gem", "image_size": args.image_size})
    device = torch.device(args.device)
    print(f"{len(names)} photos, {args.arch} at {args.image_size} px on {device} "
          f"({torch.get_num_threads()} CPU threads)")
    reference(net, root, names[:4], args.image_size, device)  # warm up
    t = time.perf_counter()
    ref = reference(net, root, names, args.image_size, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_ref = time.perf_counter() - t
    t = time.perf_counter()
    ours, bad = extract_descriptors(net, root, names, image_size=args.image_size, device=device)
    t_ours = time.perf_counter() - t
    assert not bad
    diff = float(np.abs(ours - ref).max())
    print(f"reference loop: {len(names) / t_ref:.1f} images/s ({t_ref:.1f} s)")
    print(f"sfmpairs extract: {len(names) / t_ours:.1f} images/s ({t_ours:.1f} s)")
    print(f"speed-up: {t_ref / t_ours:.2f}x  (target >= 2.00)")
    print(f"largest descriptor difference: {diff:.2e}  (target <= 1e-4)")


if __name__ == "__main__":
    main()
