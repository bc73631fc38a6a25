"""``python -m sfmpairs``, and so ``torchrun --nproc_per_node=N -m sfmpairs train ...``."""

from sfmpairs.cli import main

main(prog_name="sfmpairs")
