"""Scale out: the PPO engine under ``accelerate launch`` with two CPU processes (gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

SCRIPT = r'''
import json, sys
import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from rlhf_core.config import PPOConfig
from rlhf_core.ppo.checkpoint import save_checkpoint
from rlhf_core.ppo.trainer import build_trainer

model_path, out = sys.argv[1:3]
accelerator = Accelerator()
cfg = PPOConfig(batch_size=4, max_new_tokens=5, freeze_layers=1, learning_rate=1e-3, missing_eos_penalty=None, dtype="float32")
seen = []

def score(prompts, responses, finished):
    seen.extend(prompts)
    return torch.tensor([len(r) / 30 for r in responses])

trainer = build_trainer(cfg, model_path, score, [f"Prompt number {i}" for i in range(8)], accelerator)
history = [trainer.step() for _ in range(3)]
save_checkpoint(f"{out}-checkpoints", trainer, history, "fingerprint")
rank = accelerator.process_index
save_file({k: v.contiguous() for k, v in trainer.policy.trainable_state().items()}, f"{out}-rank{rank}.safetensors")
with open(f"{out}-rank{rank}.json", "w") as handle:
    json.dump({"processes": accelerator.num_processes, "history": history, "prompts": seen}, handle)
'''


def test_two_cpu_processes_train_one_model(tiny_base_model, tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "ppo_ddp.py"
    script.write_text(SCRIPT)
    launcher = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(script), str(tiny_base_model), str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"out-rank{r}.json").read_text()) for r in range(2)]
    assert [r["processes"] for r in ranks] == [2, 2]
    # each process sampled its own half of every batch of 4 prompts
    assert all(len(r["prompts"]) == 6 for r in ranks) and set(ranks[0]["prompts"]).isdisjoint(ranks[1]["prompts"][:2])
    # metrics are averaged over processes, so both report the same numbers
    assert ranks[0]["history"][-1]["ppo/kl"] == ranks[1]["history"][-1]["ppo/kl"]
    # DDP averaged the gradients: both copies of the model are the same and have moved
    weights = [load_file(str(tmp_path / f"out-rank{r}.safetensors")) for r in range(2)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert any(not torch.all(v == 0) for k, v in weights[0].items() if k.startswith("value_head"))
    checkpoint = tmp_path / "out-checkpoints" / "update-000003"
    assert {"rng-rank0.safetensors", "rng-rank1.safetensors", "weights.safetensors", "state.json"} <= {p.name for p in checkpoint.iterdir()}
