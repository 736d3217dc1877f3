"""The sandbox-world options of every benchmark: which weights (their ``sampler.json`` sets the sampler) and where
the models run. Results record both, so a stored table says which world it was measured on."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from erase_core.cli import DEVICE_HELP, WEIGHTS_HELP, _device


def add_world_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", type=Path, default=None, help=WEIGHTS_HELP)
    p.add_argument("--device", type=_device, default="cpu", help=DEVICE_HELP)


def load_world(args: argparse.Namespace):
    """The world of ``--weights`` on ``--device``."""
    from erase_core.sandbox.pipeline import SandboxWorld

    return SandboxWorld.load(args.weights).to(args.device)


def world_name(args: argparse.Namespace) -> str:
    """The weights folder's name (``weights_22k`` for the default world), for tables and titles."""
    from erase_core.sandbox.pipeline import weights_name

    return weights_name(args.weights)


def start_run(args: argparse.Namespace) -> None:
    """What every benchmark does first: timestamped INFO logs, ``--threads`` torch threads, the ``--out`` folder."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
