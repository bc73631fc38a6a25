"""Extraction speed: the extract command against a reference loop that decodes,
resizes and forwards one image at a time, as the authors' PyTorch code does.

On the photos in ``$SFMPAIRS_DATA/colmap/*/images`` (about 240) with resnet18 (random
weights: speed does not depend on them) and GeM at image size 362:

- the reference loop: PIL decode, thumbnail, float32 forward of one image at a time;
- ``sfmpairs extract --precision fp32``: exact float32 (batches hold images of equal
  size, so batching changes no input): speed-up and largest descriptor difference;
- ``sfmpairs extract`` (``--precision auto``: bfloat16 on CPUs that compute it
  natively, float16 on CUDA): speed-up, largest descriptor difference, and mAP of the
  reference's and of these descriptors on a val split of the same photos (their SfM
  models ingested and mined, every model in val), to show what reduced precision costs.

Each runs in a process of its own, as it would for a user: the reference with the
environment this script has, sfmpairs as its command sets itself up (``sfmpairs.cli``
imported first; it sets OMP_WAIT_POLICY=PASSIVE unless the environment sets it). Each
process makes one untimed pass (imports, oneDNN set-up) and then one timed pass; the
three alternate ``--repeats`` times and the best time of each counts.

Target (issue 4): >= 2x the reference's images per second on 2 CPU cores, with
descriptors within 1e-4 of the reference's or mAP moving by less than 0.5 points.

    python benchmarks/bench_extract.py [--device cpu|cuda] [--image-size 362] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SFMPAIRS_DATA", REPO.parent / "shared" / "data"))


def photo_names(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.glob("*/images/*") if p.suffix.lower() in (".jpg", ".png"))


def reference(net, root: Path, names, image_size: int, device) -> np.ndarray:
    """One image at a time: decode, resize, normalise, forward (cirtorch's way: PIL
    open and convert("RGB"), thumbnail with Lanczos, float32 forward)."""
    import torch
    from PIL import Image

    def load(path):
        img = Image.open(path).convert("RGB")
        img.thumbnail((image_size, image_size), Image.LANCZOS)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1)

    net = net.to(device).eval().to(memory_format=torch.contiguous_format)
    out = []
    with torch.no_grad():
        for n in names:
            x = net.normalise_input(load(root / n)[None].to(device))
            out.append(net(x).cpu().numpy()[0])
    return np.stack(out)


def child(which: str, tmp: Path, args) -> None:
    """One timed run in this process; writes desc-WHICH.npy and time-WHICH.json."""
    if which != "reference":
        importlib.import_module("sfmpairs.cli")  # the command's set-up, before torch loads
    import torch

    from sfmpairs.retrieval.descriptors import read_descriptors
    from sfmpairs.retrieval.extract import extract
    from sfmpairs.retrieval.network import load_checkpoint

    root = DATA / "colmap"
    names = photo_names(root)
    device = torch.device(args.device)

    def run():
        if which == "reference":
            net, _ = load_checkpoint(tmp / "net.pt", device)
            desc = reference(net, root, names, args.image_size, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return desc
        out = tmp / f"desc-{which}.h5"
        extract(
            tmp / "net.pt",
            out,
            images_root=root,
            image_list=tmp / "list.txt",
            image_size=args.image_size,
            device=str(device),
            precision=which,
            workers=args.workers,
            overwrite=True,
        )
        return read_descriptors(out, np.asarray(names, dtype=object))

    run()  # untimed
    t = time.perf_counter()
    desc = run()
    seconds = time.perf_counter() - t
    np.save(tmp / f"desc-{which}.npy", desc)
    (tmp / f"time-{which}.json").write_text(
        json.dumps(
            {
                "seconds": seconds,
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                "threads": torch.get_num_threads(),
            }
        )
    )


def val_map(tmp: Path, root: Path, names: list[str], desc: np.ndarray) -> float:
    """mAP on the val split of the photos' own SfM models (ingested and mined once)."""
    from sfmpairs.mining.mine import mine
    from sfmpairs.retrieval.evaluate import mean_average_precision, rank, val_ground_truth
    from sfmpairs.sfm_io.ingest import ingest
    from sfmpairs.sfm_io.store import read_store

    pairs = tmp / "pairs.h5"
    if not pairs.exists():
        scenes = sorted({n.split("/")[0] for n in names})
        ingest([root / s for s in scenes], tmp / "sfm.h5", images_root=root, cluster_by="scene")
        clusters = read_store(tmp / "sfm.h5", keys=["clusters/name"])["clusters/name"]
        mine(tmp / "sfm.h5", pairs, val_clusters=list(clusters), queries_per_cluster=0)
    all_names, queries, database, pos, junk = val_ground_truth(pairs, 1)
    row = {n: i for i, n in enumerate(names)}
    d = desc[[row[n] for n in all_names]]
    return mean_average_precision(rank(d[queries], d[database]), pos, junk)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--image-size", type=int, default=362)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="Best of this many runs of each.")
    ap.add_argument("--child", nargs=2, metavar=("WHICH", "TMP"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        return child(args.child[0], Path(args.child[1]), args)

    import torch

    from sfmpairs.retrieval.extract import autocast_dtype
    from sfmpairs.retrieval.network import build_network, save_checkpoint

    root = DATA / "colmap"
    names = photo_names(root)
    if not names:
        raise SystemExit(f"no photos under {root}/*/images (set SFMPAIRS_DATA)")
    auto = str(autocast_dtype(torch.device(args.device), "auto") or torch.float32).replace("torch.", "")
    print(
        f"{len(names)} photos, {args.arch} at {args.image_size} px on {args.device} "
        f"({torch.get_num_threads()} CPU threads); precision auto = {auto}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        save_checkpoint(
            tmp / "net.pt", build_network({"arch": args.arch, "pool": "gem", "image_size": args.image_size})
        )
        (tmp / "list.txt").write_text("\n".join(names) + "\n")
        kinds = ["reference", "fp32", "auto"]
        best = {k: float("inf") for k in kinds}
        passed = [f"--device={args.device}", f"--image-size={args.image_size}"]
        if args.workers is not None:
            passed.append(f"--workers={args.workers}")
        for _ in range(args.repeats):
            for k in kinds:
                subprocess.run([sys.executable, __file__, *passed, "--child", k, str(tmp)], check=True)
                info = json.loads((tmp / f"time-{k}.json").read_text())
                best[k] = min(best[k], info["seconds"])
                print(
                    f"  {k:<9} {info['seconds']:5.2f} s (OMP_WAIT_POLICY={info['omp_wait_policy']}, "
                    f"{info['threads']} threads)",
                    flush=True,
                )
        desc = {k: np.load(tmp / f"desc-{k}.npy") for k in kinds}
        ref, n = desc["reference"], len(names)
        print(f"reference loop:            {n / best['reference']:6.1f} images/s ({best['reference']:.2f} s)")
        for k, label in (("fp32", "extract --precision fp32: "), ("auto", f"extract (auto, {auto}):")):
            print(
                f"{label:<26} {n / best[k]:6.1f} images/s ({best[k]:.2f} s)  speed-up "
                f"{best['reference'] / best[k]:.2f}x, largest descriptor difference "
                f"{np.abs(desc[k] - ref).max():.1e}"
            )
        maps = {k: 100 * val_map(tmp, root, names, d) for k, d in desc.items()}
        print(
            f"val mAP (every model in val): reference {maps['reference']:.2f}, fp32 {maps['fp32']:.2f}, "
            f"auto {maps['auto']:.2f}: auto moves it by {abs(maps['auto'] - maps['reference']):.2f} points"
        )
        print("target: speed-up >= 2.00 with difference <= 1e-4, or mAP moving < 0.5 points")


if __name__ == "__main__":
    main()
