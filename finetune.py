"""LTX per-instance finetuning (the same as ``python -m explainer finetune``).

    python finetune.py --config configs/synthetic/ltx_finetune.yaml
    python finetune.py --config configs/synthetic/ltx_finetune.yaml --steps 10 --out runs/ltx_finetune_10
"""

import sys

from explainer.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
