"""Ablation launcher: ``python launch/ablate.py [options]`` is ``spectral-dist ablate [options]``.

    python launch/ablate.py --recipes vit_imagenet --optimizers adamw spectral_newton muon \
        --lrs 1e-3 3e-3 --seeds 0 1 2                       # print the commands
    python launch/ablate.py --grid launch/grids/vit_imagenet.yaml --submit   # one sbatch job per run
"""

import sys

from spectral_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablate", *sys.argv[1:]]))
