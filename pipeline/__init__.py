"""sfmpairs: matching and non-matching image pairs from Structure-from-Motion models.

The package is laid out by pipeline stage (Radenovic, Tolias and Chum, ECCV 2016 and
TPAMI 2018):

- ``sfmpairs.sfm_io``: COLMAP models in, an HDF5 *SfM store* out (``sfmpairs ingest``);
- ``sfmpairs.mining``: pools, positives and hard negatives (``sfmpairs mine``);
- ``sfmpairs.retrieval``: the network, descriptors, whitening and evaluation
  (``sfmpairs extract``, ``whiten``, ``evaluate``);
- ``sfmpairs.train``: fine-tuning the network on mined pairs (``sfmpairs train``);
- ``sfmpairs.synthetic``: worlds with exact geometry for the demo and tests.

docs/architecture.md is the code map.

Every stage is a plain Python function with a thin command-line wrapper in
``sfmpairs.cli``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sfmpairs")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from .common import SfmpairsError  # noqa: E402

__all__ = ["__version__", "SfmpairsError"]
