"""Kill windows: model folders replaced by rename, MLflow runs of dead processes, pickled weights refused."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_core import base_model
from rlhf_core.base_model import clean_leftovers, exchange_paths, save_model_folder
from rlhf_core.errors import RLHFError

from .conftest import REPO, rlhf, stage_metrics, write_params

FILES = ("config.json", "model.safetensors", "tokenizer.json", "normalization.json")


class FakeModel:
    """Writes what ``save_pretrained`` would, each file tagged with the save it belongs to."""

    def __init__(self, tag: str, names=("config.json", "model.safetensors")):
        self.tag, self.names = tag, names

    def save_pretrained(self, folder, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        for name in self.names:
            (Path(folder) / name).write_text(self.tag)


def save(target: Path, tag: str) -> None:
    save_model_folder(FakeModel(tag), FakeModel(tag, ("tokenizer.json",)), target, {"normalization.json": tag})


def folder_state(target: Path) -> str:
    """The tag of the save ``target`` holds whole, or 'missing' / 'mixed'."""
    if not target.is_dir():
        return "missing"
    names = sorted(p.name for p in target.iterdir())
    tags = {(target / name).read_text() for name in names}
    return tags.pop() if names == sorted(FILES) and len(tags) == 1 else "mixed"


class Killed(BaseException):
    """What the process would feel at a SIGKILL: nothing after this point runs (except the test's own checks)."""


def kill_at(monkeypatch, n: int, on_kill) -> None:
    """Make the ``n``-th file-system step of a save (writes, renames, removals, the folder swap) a kill."""
    count = 0

    def wrap(function):
        def step(*args, **kwargs):
            nonlocal count
            count += 1
            if count == n:
                on_kill()
                raise Killed(n)
            return function(*args, **kwargs)

        return step

    monkeypatch.setattr(Path, "write_text", wrap(Path.write_text))
    monkeypatch.setattr(Path, "mkdir", wrap(Path.mkdir))
    monkeypatch.setattr(os, "rename", wrap(os.rename))
    monkeypatch.setattr(shutil, "rmtree", wrap(shutil.rmtree))
    monkeypatch.setattr(base_model, "exchange_paths", wrap(base_model.exchange_paths))


def kill_every_step(tmp_path, monkeypatch, check_at_kill) -> int:
    """Kill a save of 'new' over 'old' at each of its steps in turn; returns how many steps a save has."""
    target = tmp_path / "models" / "reward"
    for n in range(1, 100):
        shutil.rmtree(tmp_path / "models", ignore_errors=True)
        save(target, "old")
        with monkeypatch.context() as patch:
            kill_at(patch, n, lambda: check_at_kill(target))
            try:
                save(target, "new")
            except Killed:
                pass
            else:
                assert folder_state(target) == "new"
                return n - 1
        clean_leftovers(target)  # what the next save does first
        assert folder_state(target) in ("old", "new"), f"kill at step {n}"
        save(target, "next")
        assert folder_state(target) == "next"
        assert sorted(p.name for p in target.parent.iterdir()) == ["reward"], f"leftovers after a kill at step {n}"
    raise AssertionError("the save never finished")


def test_a_kill_at_any_step_of_a_save_leaves_the_old_or_the_new_folder(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    if not exchange_paths(a, b):
        pytest.skip("this file system cannot swap two folders atomically (see the fallback test)")

    def check(target):
        assert folder_state(target) in ("old", "new")

    steps = kill_every_step(tmp_path, monkeypatch, check)
    assert steps >= 8  # every write, the swap and the removal of the old folder were each a kill point


def test_without_an_atomic_swap_the_next_save_restores_the_old_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(base_model, "exchange_paths", lambda a, b: False)
    windows = []

    def check(target):
        replaced = target.with_name(".reward.replaced")
        if folder_state(target) == "missing":  # between the two renames: the old folder waits beside it
            windows.append(folder_state(replaced))
        else:
            assert folder_state(target) in ("old", "new")

    kill_every_step(tmp_path, monkeypatch, check)
    assert windows == ["old"]


def test_a_failed_write_leaves_the_old_folder_and_no_staging_folder(tmp_path):
    target = tmp_path / "reward"
    save(target, "old")

    class Broken(FakeModel):
        def save_pretrained(self, folder, **kwargs):
            super().save_pretrained(folder)
            raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        save_model_folder(Broken("new"), FakeModel("new", ("tokenizer.json",)), target)
    assert folder_state(target) == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reward"]


SAVER = """
import itertools, sys
from pathlib import Path
from rlhf_core.base_model import save_model_folder

class Fake:
    def __init__(self, tag, names):
        self.tag, self.names = tag, names
    def save_pretrained(self, folder, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        for name in self.names:
            (Path(folder) / name).write_text(self.tag + " " * 200_000)  # big enough that a kill lands mid-write

target = Path(sys.argv[1])
for i in itertools.count():
    tag = f"save-{i}"
    save_model_folder(Fake(tag, ("config.json", "model.safetensors")), Fake(tag, ("tokenizer.json",)), target,
                      {"normalization.json": tag + " " * 200_000})
    print(i, flush=True)
"""


@pytest.mark.slow
def test_sigkill_during_saves_never_leaves_a_broken_folder(tmp_path):
    target = tmp_path / "reward"
    for attempt in range(10):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(target)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # one save done: there is an old folder to lose
        time.sleep(0.003 * attempt)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        tags = {(target / name).read_text().split()[0] for name in FILES}
        assert sorted(p.name for p in target.iterdir()) == sorted(FILES) and len(tags) == 1, attempt
    save(target, "after")
    assert folder_state(target) == "after" and sorted(p.name for p in tmp_path.iterdir()) == ["reward"]


# --------------------------------------------------------------------------- MLflow runs of killed stages


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_run_left_running_by_a_dead_process_is_marked_killed(work_env):
    from rlhf_core import tracking

    client = tracking._mlflow().MlflowClient()
    experiment = tracking.experiment_id()
    here, me = socket.gethostname(), tracking.process_tags()

    def running(stage: str, **tags) -> str:
        return client.create_run(experiment, tags={"stage": stage, **tags}).info.run_id

    dead = running("train_reward", host=here, pid=str(_dead_pid()))
    reused = running("train_reward", host=here, pid=me["pid"], pid_start="1")  # a new process under the old pid
    alive = running("train_reward", **me)
    elsewhere = running("train_reward", host="another-machine", pid=str(_dead_pid()))
    other_stage = running("ppo", host=here, pid=str(_dead_pid()))
    untagged = running("train_reward")

    with tracking.stage_run("train_reward", metrics_dir=work_env / "metrics") as stage:
        pass
    status = {run_id: client.get_run(run_id).info.status for run_id in (dead, reused, alive, elsewhere, other_stage, untagged)}
    assert status == {dead: "KILLED", reused: "KILLED", alive: "RUNNING", elsewhere: "RUNNING",
                      other_stage: "RUNNING", untagged: "RUNNING"}  # fmt: skip
    run = client.get_run(stage.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["host"] == here and run.data.tags["pid"] == str(os.getpid())


def test_a_run_whose_body_raises_ends_failed(work_env):
    from rlhf_core import tracking

    with pytest.raises(RLHFError, match="bad input"):
        with tracking.stage_run("prompts", metrics_dir=work_env / "metrics") as stage:
            raise RLHFError("bad input")
    assert tracking._mlflow().MlflowClient().get_run(stage.run_id).info.status == "FAILED"


def test_finishing_again_logs_only_what_is_new(work_env):
    from rlhf_core import tracking

    client = tracking._mlflow().MlflowClient()
    with tracking.stage_run("prompts", metrics_dir=work_env / "metrics") as stage:
        first = stage.finish({"prompts/kept": 5})
        stage.finish({**first, "prompts/registered_version": 2})
    assert len(client.get_metric_history(stage.run_id, "prompts/kept")) == 1
    assert client.get_run(stage.run_id).data.metrics["prompts/registered_version"] == 2
    assert stage_metrics(work_env).read("prompts") == {"prompts/kept": 5, "prompts/registered_version": 2}


# --------------------------------------------------------------------------- pickled weights


@pytest.fixture(scope="module")
def pickled_model(tiny_base_model, tmp_path_factory) -> Path:
    """The tiny model with its weights as a pickled pytorch_model.bin only (as older hub models ship)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("pickled") / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny_base_model)
    model.config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_base_model).save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def test_pickled_weights_are_refused_with_the_way_to_convert_them(pickled_model, tmp_path):
    from rlhf_core.base_model import load_causal_lm, prepare_base_model
    from rlhf_core.config import BaseModelConfig

    cfg = BaseModelConfig.model_validate({"source": str(pickled_model), "wheel": "-", "wheel_sha256": "-", "gguf_file": "-"})
    with pytest.raises(RLHFError) as refused:
        prepare_base_model(cfg, tmp_path / "base", tmp_path / "cache")
    message = str(refused.value)
    assert message.startswith(f"base_model.source '{pickled_model}': no safetensors weights") and "\n" not in message
    assert "use_safetensors=False" in message and "pytorch_model.bin" in message
    assert not (tmp_path / "base").exists()
    with pytest.raises(RLHFError, match="no safetensors weights"):
        load_causal_lm(pickled_model)


@pytest.mark.slow
def test_base_model_stage_refuses_a_pickled_source_with_exit_2(pickled_model, work_env):
    write_params(work_env, {"base_model": {"source": str(pickled_model)}})
    done = rlhf("base-model", cwd=work_env, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "unexpected error" not in done.stderr
    assert f"base_model.source '{pickled_model}': no safetensors weights" in done.stderr
    assert not (work_env / "models" / "base").exists()


# --------------------------------------------------------------------------- stage outputs replaced atomically


def test_stage_outputs_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write that dies before its rename (here: the disk fills at fsync) leaves the previous file as it was."""
    from rlhf_core import records
    from rlhf_core.evaluation import plots
    from rlhf_core.evaluation.best_of_n import FrontierPoint
    from rlhf_core.stages.train_reward import write_loss_curve

    curve, table, figure = tmp_path / "reward_loss.csv", tmp_path / "plots" / "best_of_n.csv", tmp_path / "plots" / "kl.png"
    write_loss_curve(curve, [(1, 0.69), (2, 0.5)])
    assert curve.read_text() == "step,loss\n1,0.69\n2,0.5\n"
    for path in (table, figure):
        path.parent.mkdir(exist_ok=True)
        path.write_text("previous")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(records.os, "fsync", disk_full)
    import matplotlib.pyplot as plt

    writes = {
        curve: lambda: write_loss_curve(curve, [(1, 9.0)]),
        table: lambda: plots.write_plot_data(tmp_path / "plots", [FrontierPoint(1, 0.0, 0.1, 0.2, 4)], [], {}),
        figure: lambda: plots._save(plt.figure(), figure),
    }
    for path, write in writes.items():
        before = path.read_bytes()
        with pytest.raises(OSError, match="No space"):
            write()
        assert path.read_bytes() == before, path
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["best_of_n.csv", "kl.png"]  # no temp files left
