"""LTX per-instance finetuning from the command line (masks written like ``python -m explainer explain``).

    python finetune.py --config configs/synthetic/ltx_finetune.yaml
    python finetune.py --config configs/synthetic/ltx_finetune.yaml --steps 10 --out runs/ltx_finetune_10
"""

import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from explainer.finetune import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
