"""Pipelines: what the command line runs, each a module with a ``main(argv)``.

``train`` (LightningCLI), ``finetune`` (LTX per image), ``explain`` (files -> PNG masks), ``evaluate`` (methods x
metrics -> results.json), ``export`` (safetensors / ONNX), ``report`` (docs/RESULTS.md), ``quickstart`` (the main
job on the embedded default). They import the layers below; nothing below imports them.
"""
