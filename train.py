"""Train anything of the project with Lightning's CLI.

    python train.py fit --config configs/synthetic/explanandum.yaml
    python train.py fit --config configs/synthetic/explainer.yaml --trainer.devices 2 --trainer.strategy ddp
"""

from explainer.cli import train_cli

if __name__ == "__main__":
    train_cli()
