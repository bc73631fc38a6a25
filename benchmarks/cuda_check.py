"""The CUDA path, checked and measured on a machine with a GPU (CPU gives the references).

    python benchmarks/cuda_check.py --pairs pairs.h5 --images-root world -o out/

On the pair file of a world made beforehand (``sfmpairs synth``, ``ingest``, ``mine``):

1. trains resnet18 for a few epochs on CUDA in mixed precision (the default there) and
   prints each epoch's loss, val mAP and seconds;
2. extracts the val images with the trained checkpoint on CUDA in float32 and in float16
   (``--precision auto``) and on the CPU in float32: the largest descriptor differences
   and the val mAP of each;
3. interrupts a run after its first epoch, resumes it on CUDA, and compares the weights
   with the uninterrupted run (CUDA kernels are not bit-reproducible: it reports the
   largest difference);
4. multi-scale extraction with a whitening layer on CUDA: finite, unit-norm descriptors;
5. extraction speed of an off-the-shelf resnet50 + GeM at 1024 px on generated
   1024 x 768 photos, float32 against float16, images per second.

Prints one line per check and writes ``report.json`` in the output folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def val_map(desc_file, pairs):
    from sfmpairs.retrieval.evaluate import evaluate

    return evaluate(Path(desc_file).with_suffix(".json"), pairs=pairs, descriptors=desc_file, overwrite=True)["mAP"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", required=True)
    parser.add_argument("--images-root", required=True)
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--speed-images", type=int, default=192)
    args = parser.parse_args(argv)

    import h5py
    import torch

    from sfmpairs.retrieval.extract import extract, extract_descriptors
    from sfmpairs.retrieval.network import build_network, load_checkpoint
    from sfmpairs.train.train import train

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    dev = args.device
    report = {
        "device": dev,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    print(f"device {dev}: {report['gpu']}, torch {torch.__version__}", flush=True)
    common = dict(
        arch="resnet18",
        image_size=128,
        test_image_size=224,
        query_size=200,
        pool_size=400,
        lr=1e-4,
        device=dev,
        seed=0,
        workers=4,
    )

    # 1. training on the device, mixed precision by default on CUDA
    t0 = time.perf_counter()
    train(args.pairs, args.images_root, out / "run", overwrite=True, epochs=args.epochs, **common)
    metrics = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        print(
            f"train epoch {m['epoch']}: loss {m['loss']:.4f}, val mAP {100 * m['val_map']:.2f}, {m['seconds']:.1f} s",
            flush=True,
        )
    report["train"] = {
        "seconds": time.perf_counter() - t0,
        "metrics": metrics,
        "finite": bool(all(np.isfinite(m["loss"]) for m in metrics)),
    }

    # 2. the trained checkpoint's descriptors: device fp32, device auto (fp16), CPU fp32
    best = out / "run" / "best.pt"
    with h5py.File(args.pairs, "r") as f:
        names = f["images/name"].asstr()[()]
    (out / "all.txt").write_text("\n".join(names))
    files = {}
    for label, device, precision in (
        ("device_fp32", dev, "fp32"),
        ("device_auto", dev, "auto"),
        ("cpu_fp32", "cpu", "fp32"),
    ):
        files[label] = out / f"{label}.h5"
        t = time.perf_counter()
        extract(
            best,
            files[label],
            images_root=args.images_root,
            image_list=out / "all.txt",
            device=device,
            precision=precision,
            overwrite=True,
        )
        seconds = time.perf_counter() - t
        with h5py.File(files[label], "r") as f:
            report[label] = {
                "seconds": seconds,
                "val_map": val_map(files[label], args.pairs),
                "compute_dtype": json.loads(f.attrs["parameters"])["compute_dtype"],
            }
    desc = {k: h5py.File(v, "r")["descriptors"][()] for k, v in files.items()}
    for label in ("device_fp32", "device_auto"):
        report[label]["max_difference_to_cpu_fp32"] = float(np.abs(desc[label] - desc["cpu_fp32"]).max())
        r = report[label]
        print(
            f"extract {label} ({r['compute_dtype']}): max |d - cpu fp32| {r['max_difference_to_cpu_fp32']:.2e}, "
            f"val mAP {100 * r['val_map']:.2f} (cpu fp32 {100 * report['cpu_fp32']['val_map']:.2f})",
            flush=True,
        )

    # 3. interrupted after epoch 0, resumed: against the uninterrupted run
    class Interrupted(Exception):
        pass

    def stop(epoch, metrics):
        if epoch == 0:
            raise Interrupted()

    try:
        train(args.pairs, args.images_root, out / "cut", overwrite=True, epochs=2, on_epoch_end=stop, **common)
    except Interrupted:
        pass
    train(None, None, out / "cut", resume=True)
    train(args.pairs, args.images_root, out / "full", overwrite=True, epochs=2, **common)
    a, _ = load_checkpoint(out / "full" / "last.pt")
    b, _ = load_checkpoint(out / "cut" / "last.pt")
    diff = max(
        float((x.float() - y.float()).abs().max()) for x, y in zip(a.state_dict().values(), b.state_dict().values())
    )
    report["resume_max_weight_difference"] = diff
    print(f"resume on {dev}: largest weight difference to the uninterrupted run {diff:.2e}", flush=True)

    # 4. multi-scale with a whitening layer
    torch.manual_seed(0)
    net = build_network({"arch": "resnet18", "whitening": 64}).to(dev).eval()
    d, _ = extract_descriptors(
        net, args.images_root, list(names[:32]), image_size=224, scales=(1, 0.7071, 0.5), device=dev, workers=2
    )
    ok = bool(np.isfinite(d).all() and np.allclose(np.linalg.norm(d, axis=1), 1, atol=1e-4))
    report["multiscale_whitening_finite_unit"] = ok
    print(f"multi-scale with a whitening layer on {dev}: finite and unit norm: {ok}", flush=True)

    # 5. speed: off-the-shelf resnet50 + GeM at 1024 px, fp32 against fp16
    from PIL import Image

    photos = out / "photos"
    photos.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(args.speed_images):
        img = (rng.random((24, 32, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).resize((1024, 768), Image.BILINEAR).save(photos / f"{k:04d}.jpg", quality=90)
    (out / "speed.txt").write_text("\n".join(f"{k:04d}.jpg" for k in range(args.speed_images)))
    speed = {}
    for precision in ("fp32", "auto", "fp32", "auto"):  # twice: the first of each warms up
        t = time.perf_counter()
        extract(
            None,
            out / f"speed_{precision}.h5",
            arch="resnet50",
            pool="gem",
            images_root=photos,
            image_list=out / "speed.txt",
            device=dev,
            precision=precision,
            batch_size=16,
            overwrite=True,
        )
        speed[precision] = args.speed_images / (time.perf_counter() - t)
    report["speed_resnet50_1024_images_per_s"] = speed
    print(
        f"extract resnet50 + GeM at 1024 px on {dev}: fp32 {speed['fp32']:.1f} images/s, "
        f"auto {speed['auto']:.1f} images/s ({speed['auto'] / speed['fp32']:.2f}x)",
        flush=True,
    )
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
