"""COLMAP models in, HDF5 SfM store out.

- :func:`sfmpairs.sfm_io.ingest.ingest` is the stage (``sfmpairs ingest``);
- :mod:`.colmap_binary` is the fast reader of binary models, :mod:`.colmap_text` the
  reader of text models and :mod:`.colmap_pycolmap` the reference reader through
  pycolmap; all three return the same :class:`.model.Model`;
- :mod:`.store` writes and reads the SfM store (schema in ``docs/formats.md``);
- :mod:`.reconstruct` makes COLMAP models from photos with pycolmap.

Synthetic models and the rendered world live in :mod:`sfmpairs.synthetic`.
"""
