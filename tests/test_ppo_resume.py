"""Resume: a run killed with SIGKILL and restarted ends exactly where an uninterrupted run ends."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

RUN_SCRIPT = r'''
import json, sys
import torch
from safetensors.torch import save_file
from rlhf_core.config import PPOConfig
from rlhf_core.ppo.loop import resume, run_fingerprint, train
from rlhf_core.ppo.trainer import build_trainer

torch.set_num_threads(1)
model_path, checkpoints, out = sys.argv[1:4]
cfg = PPOConfig(updates=8, batch_size=4, max_new_tokens=6, freeze_layers=1, learning_rate=1e-3, checkpoint_every=2,
                missing_eos_penalty=None, dtype="float32")

def score(prompts, responses, finished):
    return torch.tensor([len(r) / 40 for r in responses])

trainer = build_trainer(cfg, model_path, score, [f"Prompt number {i}" for i in range(10)])
fingerprint = run_fingerprint(cfg, start=model_path)
history, _ = resume(trainer, checkpoints, fingerprint, cfg.updates)
history = train(trainer, updates=cfg.updates, checkpoint_dir=checkpoints, checkpoint_every=cfg.checkpoint_every,
                fingerprint=fingerprint, history=history)
save_file({k: v.contiguous() for k, v in trainer.policy.trainable_state().items()}, out + ".safetensors")
with open(out + ".json", "w") as handle:
    json.dump(history, handle)
'''

TIMING = ("ppo/seconds", "ppo/tokens_per_second")


def _run(script: Path, model: Path, checkpoints: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(script), str(model), str(checkpoints), str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _result(out: Path) -> tuple[dict, list[dict]]:
    from safetensors.torch import load_file

    history = json.loads(out.with_suffix(".json").read_text())
    trajectory = [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in history]
    return load_file(str(out.with_suffix(".safetensors"))), trajectory


def _wait_for_checkpoint(folder: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any((p / "state.json").exists() for p in folder.glob("update-*") if not p.name.endswith(".tmp")):
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended before its first checkpoint: {process.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
def test_kill_9_then_resume_ends_exactly_like_an_uninterrupted_run(tiny_base_model, tmp_path):
    script = tmp_path / "run_ppo.py"
    script.write_text(RUN_SCRIPT)

    straight = _run(script, tiny_base_model, tmp_path / "ck-straight", tmp_path / "straight")
    killed = _run(script, tiny_base_model, tmp_path / "ck-killed", tmp_path / "resumed")
    _wait_for_checkpoint(tmp_path / "ck-killed", killed)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    assert not (tmp_path / "resumed.json").exists()  # it really was cut short

    resumed = _run(script, tiny_base_model, tmp_path / "ck-killed", tmp_path / "resumed")
    for process in (straight, resumed):
        assert process.wait(timeout=300) == 0, process.stderr.read().decode()[-2000:]

    weights, history = _result(tmp_path / "straight")
    resumed_weights, resumed_history = _result(tmp_path / "resumed")
    assert weights.keys() == resumed_weights.keys()
    assert all(torch.equal(weights[k], resumed_weights[k]) for k in weights)
    assert resumed_history == history and [row["update"] for row in history] == list(range(1, 9))
    assert [p.name for p in (tmp_path / "ck-killed").iterdir()] == ["update-000008"]  # only the newest is kept


def test_non_finite_loss_stops_with_one_line_naming_the_update_and_keeps_the_checkpoint(tiny_base_model, tmp_path):
    from rlhf_core.config import PPOConfig
    from rlhf_core.errors import RLHFError
    from rlhf_core.ppo.checkpoint import latest_checkpoint
    from rlhf_core.ppo.loop import train
    from rlhf_core.ppo.trainer import build_trainer

    calls = []

    def score(prompts, responses, finished):
        calls.append(1)
        return torch.full((len(prompts),), float("nan") if len(calls) == 3 else 0.5)

    cfg = PPOConfig(updates=5, batch_size=2, max_new_tokens=4, freeze_layers=1, checkpoint_every=1, missing_eos_penalty=None, dtype="float32")
    trainer = build_trainer(cfg, tiny_base_model, score, ["a", "b", "c"])
    with pytest.raises(RLHFError) as failure:
        train(trainer, updates=5, checkpoint_dir=tmp_path, checkpoint_every=1, fingerprint="x", history=[])
    message = str(failure.value)
    assert "\n" not in message and "update 3" in message and "non-finite score" in message
    assert latest_checkpoint(tmp_path).name == "update-000002" and "update-000002" in message
