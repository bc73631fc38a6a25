"""Pools, positives and hard negatives from an SfM store (Radenovic et al.).

- :mod:`.pools`: the pool M(q) of each query (nearest camera centres in its model) and,
  for every candidate, the co-observed 3D points, inlier ratio and scale change;
- :mod:`.negatives`: hard negatives by descriptor similarity, at most one per cluster
  (the function training calls every epoch);
- :mod:`.mine`: the stage (``sfmpairs mine``), which writes the pair file
  (:mod:`.pairfile`, schema in docs/formats.md).
"""
