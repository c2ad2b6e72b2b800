"""Train anything of the project with Lightning's CLI (the same as ``python -m explainer train``).

    python train.py fit --config configs/synthetic/explanandum.yaml
    python train.py fit --config configs/synthetic/explainer.yaml --trainer.devices 2 --trainer.strategy ddp
"""

import sys

from explainer.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
