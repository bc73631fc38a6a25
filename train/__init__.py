"""Fine-tuning the retrieval network on mined pairs (``sfmpairs train``).

- :mod:`.options`: the training options and their defaults (plain data);
- :mod:`.train`: per-epoch query and pool draws, positives, hard negatives re-mined
  with the current network, contrastive or triplet loss, validation, checkpoints;
- :mod:`.dataset`: a ``torch.utils.data.Dataset`` of mined tuples for any training loop.
"""
