"""Run a training stage under ``accelerate launch`` when params ask for several processes.

``orchestration.launcher`` picks an accelerate config from ``accelerate/``
(``ddp``, ``deepspeed`` = ZeRO-2, ``deepspeed3`` = ZeRO-3); the stage command in
``dvc.yaml`` stays the same.  On a machine without CUDA, DDP runs on CPU
processes with the gloo backend (``ACCELERATE_USE_CPU=1 --multi_gpu``; note that
``accelerate launch --cpu --num_processes N`` silently starts one process).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rlhf_core.config import OrchestrationConfig
from rlhf_core.errors import RLHFError

#: subcommands whose training loop runs through accelerate
DISTRIBUTED_COMMANDS = {"train-reward", "ppo"}
CONFIGS = {"ddp": "ddp.yaml", "deepspeed": "deepspeed_zero2.yaml", "deepspeed3": "deepspeed_zero3.yaml"}
CONFIG_DIR = Path(__file__).resolve().parents[1] / "accelerate"


def inside_launcher() -> bool:
    """True in a process started by accelerate/torchrun (they set the rank variables)."""
    return "LOCAL_RANK" in os.environ or "RANK" in os.environ


def launch_command(command: str, params_path: str, cfg: OrchestrationConfig, cuda: bool) -> tuple[list[str], dict]:
    """The ``accelerate launch`` command line and environment for one stage."""
    config = CONFIG_DIR / CONFIGS[cfg.launcher]
    if not config.exists():
        raise RLHFError(f"{config}: accelerate config for launcher {cfg.launcher!r} not found")
    env = dict(os.environ)
    args = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--num_processes", str(cfg.num_processes)]
    if not cuda:
        if cfg.launcher != "ddp":
            raise RLHFError(f"orchestration.launcher {cfg.launcher!r} needs GPUs; use 'ddp' (gloo on CPU) here")
        env["ACCELERATE_USE_CPU"] = "1"
        args += ["--multi_gpu", "--mixed_precision", "no"]
    return args + ["-m", "rlhf_core.cli", command, "--params", params_path], env


def relaunch_if_distributed(command: str, params_path: str, cfg: OrchestrationConfig) -> int | None:
    """Re-run ``command`` under accelerate and return its exit status, or None to run it in this process."""
    if command not in DISTRIBUTED_COMMANDS or cfg.launcher == "none" or inside_launcher():
        return None
    import torch

    args, env = launch_command(command, params_path, cfg, torch.cuda.is_available())
    print(f"rlhf {command}: launching {cfg.num_processes} processes ({cfg.launcher})", file=sys.stderr)
    return subprocess.run(args, env=env).returncode
