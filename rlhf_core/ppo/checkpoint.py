"""Resumable PPO checkpoints, written atomically so that ``kill -9`` can never leave a half-written one.

A checkpoint is a folder ``update-000005/`` holding

* ``weights.safetensors`` - the trainable weights only (the frozen rest is the base model);
* ``optimizer.safetensors`` + ``optimizer.json`` - optimiser tensors and structure;
* ``rng-rank<N>.safetensors`` + ``rng-rank<N>.json`` - every random state of process N
  (python, numpy, torch, and the sampling generator);
* ``state.json`` - update index, prompt cursor, KL controller, metrics history,
  config hash and process count.

It is written into ``update-000005.tmp``, every file is fsynced, and the folder is
renamed into place (then the parent is fsynced): a folder without ``.tmp`` is
complete.  Only the newest checkpoint is kept.  Nothing here is pickled.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlhf_core.ppo.trainer import PPOTrainer

PREFIX = "update-"
STATE_FILE = "state.json"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1))
    _fsync(path)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    _fsync(path)


# --------------------------------------------------------------------------- optimiser and random states


def optimizer_to_files(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser state dict into tensors (for safetensors) and the JSON-able rest."""
    tensors, scalars = {}, {}
    for index, entry in state_dict["state"].items():
        scalars[str(index)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[str(index)][key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {int(index): dict(entry) for index, entry in meta["state"].items()}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state[int(index)][key] = tensor
    return {"state": state, "param_groups": meta["param_groups"]}


def random_states(generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    """Every random state this process uses, as tensors and JSON."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {
        "torch": torch.get_rng_state(),
        "sampling": generator.get_state(),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
    }
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, state, gauss = random.getstate()
    meta = {"python": [version, list(state), gauss], "numpy": [kind, int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def restore_random_states(tensors: dict[str, torch.Tensor], meta: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(tensors["torch"])
    generator.set_state(tensors["sampling"])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------- save / find / load


def checkpoint_name(update: int) -> str:
    return f"{PREFIX}{update:06d}"


def save_checkpoint(root: str | Path, trainer: PPOTrainer, history: list[dict], config_hash: str) -> Path:
    """Write a checkpoint of ``trainer`` after its current update; every process must call this."""
    accelerator, root = trainer.accelerator, Path(root)
    final = root / checkpoint_name(trainer.update)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    tensors, meta = random_states(trainer.generator)
    rank = accelerator.process_index
    _write_tensors(tmp / f"rng-rank{rank}.safetensors", tensors)
    _write_json(tmp / f"rng-rank{rank}.json", meta)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_tensors(tmp / "weights.safetensors", trainer.policy.trainable_state())
        opt_tensors, opt_meta = optimizer_to_files(trainer.optimizer.state_dict())
        _write_tensors(tmp / "optimizer.safetensors", opt_tensors)
        _write_json(tmp / "optimizer.json", opt_meta)
        state = {**trainer.state(), "history": history, "config_hash": config_hash, "processes": accelerator.num_processes}
        _write_json(tmp / STATE_FILE, state)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync(root)
        for old in root.glob(f"{PREFIX}*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (``.tmp`` folders are unfinished writes)."""
    found = [p for p in Path(root).glob(f"{PREFIX}*") if not p.name.endswith(".tmp") and (p / STATE_FILE).exists()]
    return max(found, key=lambda p: int(p.name.removeprefix(PREFIX)), default=None)


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def load_checkpoint(path: Path, trainer: PPOTrainer) -> list[dict]:
    """Restore ``trainer`` from the checkpoint at ``path``; returns the metrics history up to it."""
    state = read_state(path)
    trainer.policy.load_trainable_state(load_file(str(path / "weights.safetensors")))
    # Loaded on the CPU: the optimiser moves its moments to the parameters' device and keeps ``step`` where it belongs.
    optimizer_state = optimizer_from_files(
        load_file(str(path / "optimizer.safetensors")), json.loads((path / "optimizer.json").read_text())
    )
    trainer.optimizer.load_state_dict(optimizer_state)
    rank = trainer.accelerator.process_index
    restore_random_states(
        load_file(str(path / f"rng-rank{rank}.safetensors")), json.loads((path / f"rng-rank{rank}.json").read_text()), trainer.generator
    )
    trainer.load_state(state)
    return state["history"]
