"""``python -m explainer serve``: an explainer's masks over HTTP (LitServe, dynamic batching).

    python -m explainer serve --checkpoint checkpoints/synthetic_explainer.safetensors --port 8000

The flags are the fields of :class:`~explainer.serving.app.ServeSettings` (plus ``--checkpoint`` and
``--config``), parsed by ``explainer.pipelines.args.parse`` like every verb's. docs/SERVING.md has the request
and response schema, the status codes of bad requests and a ``curl`` example.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import typing

from jsonargparse import ArgumentParser

from explainer.pipelines.args import parse
from explainer.serving.app import ServeSettings, build_server


def config_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m explainer serve", exit_on_error=False,
                       description="Serve an explainer's masks over HTTP (LitServe, dynamic batching).")
    p.add_argument("--config", action="config", help="YAML file of the settings below")
    p.add_argument("--checkpoint", type=str, required=True, help="explainer .ckpt or .safetensors export")
    types = typing.get_type_hints(ServeSettings)
    for f in dataclasses.fields(ServeSettings):
        flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        p.add_argument(*flags, dest=f.name, type=types[f.name], default=f.default, help=f.metadata["help"])
    return p


def _interrupt_main(pid: int):
    def handler(signum, frame):
        if os.getpid() != pid:  # a forked API server inherited this handler: end as SIGTERM would
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    return handler


def main(argv: list[str] | None = None) -> int:
    a = parse(config_parser(), argv)
    s = ServeSettings(**{f.name: a[f.name] for f in dataclasses.fields(ServeSettings)})
    server = build_server(a.checkpoint, s)
    signal.signal(signal.SIGTERM, _interrupt_main(os.getpid()))  # SIGTERM shuts down the workers too, as Ctrl+C does
    server.run(host=s.host, port=s.port, num_api_servers=s.num_api_servers, log_level=s.log_level,
               generate_client_file=False, access_log=s.access_log)
    return 0
