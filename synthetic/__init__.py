"""Synthetic data with exact geometry, for the demo, tests and benchmarks (not input or
output of the pipeline):

- :mod:`.world`: a rendered world of textured places, photos, exact COLMAP models and
  (on request) exact depth maps (``sfmpairs synth``; ``--hard`` for look-alike places,
  occluders, strong viewpoint and lighting change, and distractor photos);
- :mod:`.models`: random COLMAP reconstructions without photos, written with pycolmap.
"""
