"""The configurations of the retrieval stages (``sfmpairs extract``, ``evaluate``,
``whiten``): plain data, no torch, so that the command line shows them quickly. Each
default is written here once; training shares :class:`DeviceConf`.
"""

from __future__ import annotations

from dataclasses import dataclass

from sfmpairs.common import SfmpairsError
from sfmpairs.config import setting

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
WHITENINGS = ("lw", "pca")
EVALUATION_POSITIVES = ("covisible", "relaxed")


def parse_scales(text: str) -> tuple[float, ...]:
    """``1,0.7071,0.5`` -> (1.0, 0.7071, 0.5): positive numbers."""
    try:
        scales = tuple(float(s) for s in text.split(","))
    except ValueError:
        raise SfmpairsError("give comma-separated numbers, e.g. 1,0.7071,0.5") from None
    if not scales or any(s <= 0 for s in scales):
        raise SfmpairsError("scales must be positive")
    return scales


@dataclass(frozen=True)
class DeviceConf:
    device: str = setting("auto", "auto, cpu or cuda (cuda:N for one GPU).")
    workers: int | None = setting(
        None, "DataLoader worker processes decoding images.", default_text="cores - 1, at most 4"
    )


@dataclass(frozen=True)
class ExtractionConf(DeviceConf):
    """How descriptors are extracted: shared by extract and evaluate."""

    image_size: int | None = setting(
        None,
        "Longer side in pixels (never up-scaled).",
        default_text="the network's test size, 1024 unless its checkpoint says",
    )
    scales: tuple[float, ...] = setting(
        (1.0,),
        "Scales, combined by the generalised mean (GeM's p; 1 with a whitening layer), e.g. 1,0.7071,0.5.",
        name="multiscale",
        parse=parse_scales,
    )
    precision: str = setting(
        "auto",
        "Forward pass: auto = float16 on CUDA, bfloat16 on CPUs that compute it natively, else float32; fp32 = exact.",
        choices=PRECISIONS,
    )
    batch_size: int = setting(16, "Images per batch (of equal size).")

    def check(self) -> None:
        """Refuse settings outside their range, naming the option."""
        for ok, message in (
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.workers is None or self.workers >= 0, "--workers must be 0 or more"),
            (self.image_size is None or self.image_size >= 1, "--image-size must be at least 1"),
            (all(s > 0 for s in self.scales), "--multiscale: scales must be positive"),
        ):
            if not ok:
                raise SfmpairsError(message)


@dataclass(frozen=True)
class ExtractConf(ExtractionConf):
    skip_bad: bool = setting(False, "Skip missing or corrupt images (listed in the output).")


@dataclass(frozen=True)
class EvaluateConf(ExtractionConf):
    min_covisible: int = setting(1, "Positive: shares at least this many 3D points with the query.")
    positives: str = setting(
        "covisible", "covisible: --min-covisible; relaxed: passes the relaxed filter.", choices=EVALUATION_POSITIVES
    )
    qe: int = setting(0, "alpha query expansion: neighbours (0: off).")
    qe_alpha: float = setting(3.0, "alpha of alpha-QE.")


@dataclass(frozen=True)
class WhitenConf:
    method: str = setting("lw", "lw: learned from matching pairs; pca: PCA whitening.", choices=WHITENINGS)
    dim: int | None = setting(
        None, "Output dimension.", default_text="the input's, or the rank of the data where that is lower"
    )
    all_passing: bool = setting(False, "Learn from every passing pool pair, not only query-positive pairs.")
