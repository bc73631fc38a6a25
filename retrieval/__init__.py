"""Retrieval: the network, its descriptors, whitening and evaluation (the paper's
fine-tuned CNN and how it is measured); :mod:`sfmpairs.train` fine-tunes it.

- :mod:`.backbones`: the backbones and poolings sfmpairs knows (plain data);
- :mod:`.network`: torchvision backbones cut after their last convolutional block,
  MAC / SPoC / GeM / R-MAC pooling, optional whitening, L2 normalisation; checkpoints;
- :mod:`.data`: image lists, decoding in DataLoader workers, batches of equal size;
- :mod:`.extract`: fast (multi-scale) descriptor extraction (``sfmpairs extract``);
- :mod:`.whiten`: learned (Lw) and PCA whitening (``sfmpairs whiten``);
- :mod:`.evaluate`: mAP and mP@k on a pair file's val split or on the revisited
  Oxford and Paris ground truth (``sfmpairs evaluate``).
"""
