"""Benchmark: our PPO engine (rlhf_core.ppo) against trl 1.12.0's PPOTrainer, side by side on this machine.

Both sides run the same workload - the base model (SmolLM2-135M-Instruct) as
policy, the same prompts, the PPO settings of params.yaml's ``ppo:`` section
(batch 8, 32 new tokens, 2 PPO epochs, one minibatch, temperature 1.0), the same
reward model, the same thread count - each in its own subprocess so that peak
RSS is per side, alternating: ours (default mode), TRL, ours (full fine-tuning),
and again for every round.  The first update of every run is warm-up and left
out of the medians.

    .venv/bin/python bench/ppo_vs_trl.py                     # 5 updates x 3 sides x 2 rounds, ~13 min when quiet
    .venv/bin/python bench/ppo_vs_trl.py --updates 2 --rounds 1 --model /tmp/tiny --params /tmp/tiny-params.yaml

Writes bench/results/ppo_vs_trl_<date>.json (machine, versions, config, every
raw timing, summary, ratios) and prints a markdown table.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from ppo_bench import summary  # noqa: E402  (bench/ is on sys.path when this file runs as a script)
from ppo_bench.baseline import TRL_VERSION  # noqa: E402
from ppo_bench.host import machine  # noqa: E402
from ppo_bench.workload import Workload, first_prompts  # noqa: E402
from rlhf_core.artifacts import ModelFolder  # noqa: E402
from rlhf_core.errors import RLHFError  # noqa: E402

#: The sides, in the order they alternate, with their changes to params.yaml's ``ppo:`` section.  Full fine-tuning
#: gets a value model of its own, like TRL's policy + separate value model.  The ``-bf16`` sides run both engines in
#: bf16 mixed precision (for CPUs with fast bf16); each ours side is compared with the TRL side of its dtype
#: (:data:`BASELINE_OF`).
SIDES = {
    "ours-default": ("ours", {}),
    "trl": ("trl", {}),
    "ours-full": ("ours", {"mode": "full", "dtype": "float32", "value_model": "separate"}),
    "ours-bf16": ("ours", {"dtype": "bfloat16"}),
    "ours-full-bf16": ("ours", {"mode": "full", "dtype": "bfloat16", "value_model": "separate"}),
    "trl-bf16": ("trl", {"dtype": "bfloat16"}),
    "trl-reuse": ("trl", {}),
}
DEFAULT_SIDES = ["ours-default", "trl", "ours-full"]
BASELINE_OF = {"ours-default": "trl", "ours-full": "trl", "ours-bf16": "trl-bf16", "ours-full-bf16": "trl-bf16", "trl-reuse": "trl"}
#: ``RLHF_ALLOCATOR`` of each side's process (:func:`rlhf_core.runtime.tune_allocator`): our engine runs as the
#: ``rlhf`` command runs it (freed memory reused), TRL as it ships (the system's); ``trl-reuse`` is TRL with our
#: setting, to show how much of a ratio is the allocator's.
ALLOCATOR_OF = {name: "system" if name in ("trl", "trl-bf16") else "reuse" for name in SIDES}
MATMUL_DTYPES = ("float32", "bfloat16")


def matmul_dtypes(sides: list[str], fast_bf16: bool) -> tuple[str, ...]:
    """The dtypes whose matmul peak the run measures: fp32 always, bf16 where a side runs in it or the CPU has fast
    bf16 (without AVX-512 BF16 or AMX a 2048^3 bf16 matmul runs at ~1 GFLOP/s: minutes per measurement)."""
    bf16 = fast_bf16 or any(SIDES[name][1].get("dtype") == "bfloat16" for name in sides)
    return MATMUL_DTYPES if bf16 else ("float32",)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="policy's starting weights (default: params.yaml paths.base_model)")
    parser.add_argument("--params", default=str(REPO / "params.yaml"), help="params file whose ppo: section both sides run")
    parser.add_argument("--updates", type=int, default=5, help="PPO updates per run (the first is warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="times the sequence of sides is repeated")
    parser.add_argument("--prompts", type=int, default=64, help="first N prompts (by id) of paths.prompt_source")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on every side")
    parser.add_argument("--sides", nargs="+", choices=list(SIDES), default=DEFAULT_SIDES,
                        help="sides to run, in order (ours-bf16, ours-full-bf16 and trl-bf16: in bf16 mixed precision; "
                             "trl-reuse: TRL with our allocator setting)")
    parser.add_argument("--trl-dir", default=str(REPO / ".work" / "bench" / f"trl-{TRL_VERSION}"), help="where trl 1.12.0 lives")
    parser.add_argument("--out", help="result JSON (default: bench/results/ppo_vs_trl_<date>.json)")
    parser.add_argument("--work-dir", default=str(REPO / ".work" / "bench"), help="where each run keeps its logs and reward model")
    parser.add_argument("--max-load", type=float, default=3.0, help="wait while the 1-minute load average is above this")
    parser.add_argument("--max-wait", type=float, default=600, help="longest wait for the load to drop, in seconds")
    parser.add_argument("--child", choices=["reward-model", "matmul", "ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.updates < 2:
        parser.error("--updates must be at least 2 (the first update of each run is warm-up)")
    return args


# --------------------------------------------------------------------------- subprocesses


def child_main(kind: str, job: dict) -> dict:
    """What a subprocess does: build the reward model, measure matmul peaks, or run one side (with the allocator its
    ``RLHF_ALLOCATOR`` asks for, :data:`ALLOCATOR_OF`)."""
    if kind == "reward-model":
        from ppo_bench.workload import build_reward_model

        return build_reward_model(job["model"], Path(job["out"]), job["max_length"])
    if kind == "matmul":
        import torch

        from ppo_bench.flops import matmul_peak_flops

        torch.set_num_threads(job["threads"])
        return {dtype: matmul_peak_flops(dtype) for dtype in job.get("dtypes", MATMUL_DTYPES)}
    from rlhf_core.runtime import tune_allocator

    tuned = tune_allocator()
    if kind == "ours":
        from ppo_bench import ours as side
    else:
        from ppo_bench import baseline as side
    return side.run(Workload(**job)) | {"allocator_tuned": tuned}


def run_child(kind: str, job: dict, log: Path, threads: int, allocator: str = "reuse") -> dict:
    """Run ``kind`` in a fresh interpreter; its last stdout line is its JSON result, its stderr goes to ``log``."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=log.parent, delete=False) as handle:
        json.dump(job, handle)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "RLHF_ALLOCATOR": allocator}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--job", handle.name]
    try:
        with log.open("w") as err:
            done = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    finally:
        Path(handle.name).unlink()
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = log.read_text().strip().splitlines()[-5:]
        return {"error": f"exit status {done.returncode}", "stderr_tail": tail, "log": str(log)}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- setting up


def ensure_trl(trl_dir: Path) -> None:
    """Install trl 1.12.0 into ``trl_dir`` (no dependencies: it reuses the project's) unless it is there."""
    if (trl_dir / "trl" / "__init__.py").exists():
        return
    print(f"installing trl {TRL_VERSION} into {trl_dir} ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(trl_dir), f"trl=={TRL_VERSION}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RLHFError(f"pip install trl=={TRL_VERSION} failed: {tail[0]}")


def base_model_path(model: str | None, params) -> Path:
    path = Path(model) if model else REPO / params.paths.base_model
    if not ModelFolder(path, "base_model").exists():
        raise RLHFError(
            f"{path}: no base model there; run `rlhf base-model` (or `dvc repro base_model`) first, or pass --model PATH"
        )
    return path.resolve()


def wait_for_quiet(max_load: float, max_wait: float, poll: float = 30.0) -> float:
    """Wait (at most ``max_wait`` s) for the 1-minute load average to fall to ``max_load``; return the seconds waited."""
    start = time.monotonic()
    while os.getloadavg()[0] > max_load and (left := max_wait - (time.monotonic() - start)) > 0:
        print(f"load average {os.getloadavg()[0]:.1f} > {max_load}: waiting ({left:.0f} s left)", file=sys.stderr)
        time.sleep(min(poll, left))
    return time.monotonic() - start


def cpu_pressure() -> dict | None:
    """Linux PSI: the share of time some runnable task waited for a CPU (10 s, 60 s, 300 s averages, in %)."""
    try:
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    return {key: float(value) for key, value in (item.split("=") for item in some) if key.startswith("avg")}


def versions() -> dict:
    names = ("torch", "transformers", "accelerate", "peft", "datasets", "trl")
    return {name: metadata.version(name) for name in names} | {"trl_baseline": TRL_VERSION}


def git_state() -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "uncommitted_in_rlhf_core": git("status", "--porcelain", "--", "rlhf_core").splitlines()}


# --------------------------------------------------------------------------- the run


def drive(args: argparse.Namespace) -> int:
    from rlhf_core import runtime
    from rlhf_core.config import load_params

    runtime.configure(REPO)
    params = load_params(args.params)
    model = base_model_path(args.model, params)
    trl_dir = Path(args.trl_dir).resolve()
    if any(SIDES[name][0] == "trl" for name in args.sides):
        ensure_trl(trl_dir)
    prompts = first_prompts(REPO / params.paths.prompt_source, params.prompts.text_field, args.prompts)
    # A folder of its own per invocation: logs are kept, the reward model (rebuilt each time) is removed at the end.
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=datetime.datetime.now().strftime("%Y%m%d-%H%M%S-"), dir=args.work_dir))
    try:
        return measure(args, params, model, trl_dir, prompts, run_dir)
    finally:
        shutil.rmtree(run_dir / "reward-model", ignore_errors=True)


def measure(args: argparse.Namespace, params, model: Path, trl_dir: Path, prompts: list[str], logs: Path) -> int:
    """Reward model, matmul peaks, the alternating sides, matmul peaks again; write the JSON, print the table."""
    load = {"at_start": os.getloadavg(), "cpu_pressure_at_start": cpu_pressure()}
    load["waited_seconds"] = wait_for_quiet(args.max_load, args.max_wait)
    load["after_wait"] = os.getloadavg()

    def must(kind: str, job: dict, name: str) -> dict:
        result = run_child(kind, job, logs / f"{name}.log", args.threads)
        if "error" in result:
            raise RLHFError(f"{name} failed ({result['error']}): {' | '.join(result['stderr_tail'])}")
        return result

    reward_job = {"model": str(model), "out": str(logs / "reward-model"), "max_length": params.reward.max_length}
    reward = must("reward-model", reward_job, "reward-model")
    host = machine()
    matmul_job = {"threads": args.threads, "dtypes": matmul_dtypes(args.sides, host["avx512_bf16"] or host["amx_bf16"])}
    peaks_before = must("matmul", matmul_job, "matmul-before")

    runs = run_sides(args, params, Workload("", str(model), reward["path"], prompts, {}, args.updates, args.threads, str(trl_dir)), logs)

    peaks_after = must("matmul", matmul_job, "matmul-after")
    load.update(at_end=os.getloadavg(), cpu_pressure_at_end=cpu_pressure())
    peaks = {dtype: max(peaks_before[dtype], peaks_after[dtype]) for dtype in matmul_job["dtypes"]}

    report = summarise(runs, args.sides, peaks)
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"ppo_vs_trl_{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "ppo_vs_trl",
        "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "machine": host,
        "versions": versions(),
        "git": git_state(),
        "config": {
            "model": str(model),
            "reward_model": reward,
            "prompt_source": params.paths.prompt_source,
            "prompts": len(prompts),
            "updates_per_run": args.updates,
            "warmup_updates_per_run": 1,
            "rounds": args.rounds,
            "threads": args.threads,
            "ppo": params.ppo.model_dump(),
            "sides": {name: dict(SIDES[name][1]) for name in args.sides},
            "allocators": {name: ALLOCATOR_OF[name] for name in args.sides},
        },
        "load_average": load,
        "matmul_peak_flops": {"before": peaks_before, "after": peaks_after, "best": peaks},
        **report,
        "runs": runs,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(report["markdown"])
    print(json.dumps(report["checks"]))
    print(f"results: {out}  (logs: {logs})", file=sys.stderr)
    return 0


def run_sides(args: argparse.Namespace, params, template: Workload, logs: Path) -> list[dict]:
    """Every side in turn, ``args.rounds`` times, each in its own subprocess; one result per run."""
    from rlhf_core.config import PPOConfig

    runs = []
    for round_index in range(1, args.rounds + 1):
        for name in args.sides:
            kind, overrides = SIDES[name]
            ppo = PPOConfig.model_validate({**params.ppo.model_dump(), **overrides}).model_dump()
            workload = replace(template, side=name, ppo=ppo)
            before = {"load_before": os.getloadavg(), "cpu_pressure_before": cpu_pressure()}
            log = logs / f"{name}-round{round_index}.log"
            result = run_child(kind, asdict(workload), log, args.threads, ALLOCATOR_OF[name])
            result.update(side=name, round=round_index, **before)
            runs.append(result)
            print(progress_line(result), file=sys.stderr)
    return runs


def progress_line(result: dict) -> str:
    name = f"round {result['round']} {result['side']}"
    if "error" in result:
        return f"{name}: FAILED ({result['error']}; see {result['log']})"
    seconds = ", ".join(f"{u['seconds']:.1f}" for u in result["updates"])
    return f"{name}: s/update {seconds}; peak RSS {result['peak_rss_bytes'] / summary.GIB:.2f} GiB"


def summarise(runs: list[dict], sides: list[str], peaks: dict[str, float]) -> dict:
    """Per-side figures, ratios against the TRL side of the same dtype, the speed checks and the markdown table."""
    per_side = {name: summary.side_summary([r for r in runs if r["side"] == name and "error" not in r], peaks) for name in sides}
    ratios = {}
    for name, side in per_side.items():
        baseline = per_side.get(BASELINE_OF.get(name, ""), {})
        if side.get("steady_updates") and baseline.get("steady_updates"):
            ratios[name] = summary.ratios(side, baseline)
    return {
        "summary": per_side,
        "ratios": ratios,
        "speedup": {name: ratio["speedup"] for name, ratio in ratios.items()},  # per side, vs TRL as it ships, same dtype
        "checks": summary.checks(ratios.get("ours-default"), ratios.get("ours-full")),
        "failures": [{k: r[k] for k in ("side", "round", "error", "stderr_tail")} for r in runs if "error" in r],
        "markdown": summary.markdown_table(per_side, ratios),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child_main(args.child, json.loads(Path(args.job).read_text()))))
        return 0
    try:
        return drive(args)
    except RLHFError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
