"""Synthetic data with exact geometry, for the demo, tests and benchmarks (not input or
output of the pipeline):

- :mod:`.world`: a rendered world of textured places, photos and exact COLMAP models
  (``sfmpairs synth``);
- :mod:`.models`: random COLMAP reconstructions without photos, written with pycolmap.
"""
