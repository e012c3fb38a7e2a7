"""``python -m medssl_bench ...``: the ``bench`` command, as torchrun starts it in every
process of a distributed run (``torchrun --nproc-per-node N -m medssl_bench run ...``)."""

import sys

from medssl_bench.cli import entry

if __name__ == "__main__":
    sys.exit(entry())
