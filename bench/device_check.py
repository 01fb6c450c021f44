"""Accelerator check: the pipeline's three heavy paths on whatever device torch finds, timed, with peak memory.

1. sampling   - K candidates per prompt through ``sample_completions`` (the ``generate_candidates`` path);
2. reward     - simulated rankings of them (``collect_preferences``' annotators), then ``fit_reward_model``
                (TRL's RewardTrainer, in ``reward.dtype``) and scoring through ``RewardModel.score``;
3. PPO        - ``build_trainer`` + ``step()`` against that reward model (the ``ppo`` stage's engine).

Settings come from params.yaml (``candidates``, ``labeling``, ``reward``, ``ppo``); only sizes are overridden here.
The base model is params.yaml's, or with ``--shape smollm2-135m`` a randomly initialised model of SmolLM2-135M's
shape (the text is noise, the timings and memory are those of the real model; nothing has to be downloaded).

    .venv/bin/python bench/device_check.py --shape smollm2-135m --prompts 128 --updates 6
    .venv/bin/python bench/device_check.py --shape tiny --prompts 8 --updates 2      # a seconds-long CPU smoke run

Prints one table and writes the figures as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: Model shapes buildable from config (``base_model.tiny`` fields).
SHAPES = {
    "smollm2-135m": {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "intermediate_size": 1536},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 128},
}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(REPO / "params.yaml"), help="params file whose sections are used")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="random model of this shape instead of paths.base_model")
    parser.add_argument("--prompts", type=int, default=128, help="training prompts sampled (first N by id)")
    parser.add_argument("--updates", type=int, default=6, help="PPO updates (the first is left out of the median)")
    parser.add_argument("--out", help="JSON file for the figures (default: print only)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (models, preferences) and print it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rlhf_core.config import load_params
    from rlhf_core.errors import RLHFError

    work = Path(tempfile.mkdtemp(prefix="device-check-"))
    try:
        return check(args, load_params(args.params), work)
    except RLHFError as exc:
        print(f"device check: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"scratch folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def check(args: argparse.Namespace, params, work: Path) -> int:
    import torch

    from rlhf_core.artifacts import BundleFolder
    from rlhf_core.base_model import build_tiny
    from rlhf_core.config import TinyModelConfig
    from rlhf_core.evaluation.likelihood import response_logprobs
    from rlhf_core.generation import load_policy, sample_completions
    from rlhf_core.precision import default_device
    from rlhf_core.ppo.trainer import build_trainer
    from rlhf_core.preferences import bundle_pairs
    from rlhf_core.prompts import import_prompts
    from rlhf_core.reward import RewardModel
    from rlhf_core.reward.data import load_prompt_comparisons, num_pairs
    from rlhf_core.reward.trainer import fit_reward_model
    from rlhf_core.stages.collect_preferences import simulated_bundle, write_outputs
    from rlhf_core.stages.generate_candidates import to_completions

    reward_cfg, ppo_cfg = params.reward, params.ppo.model_copy(update={"updates": args.updates})
    model_dir = Path(params.paths.base_model)
    if args.shape:
        model_dir = work / "base"
        build_tiny(TinyModelConfig(**SHAPES[args.shape]), model_dir)
        top = SHAPES[args.shape]["num_hidden_layers"] - 1  # frozen layers must stay below the model's depth
        reward_cfg = reward_cfg.model_copy(update={"freeze_layers": min(reward_cfg.freeze_layers, top)})
        ppo_cfg = ppo_cfg.model_copy(update={"freeze_layers": min(ppo_cfg.freeze_layers, top)})
    device = default_device()
    source = import_prompts(
        params.paths.prompt_source, params.prompts.format, params.prompts.text_field, lambda text: 0, params.prompts.max_tokens
    )
    prompts = sorted(source.prompts, key=lambda p: p.id)[: args.prompts]
    report: dict = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "model": args.shape or str(model_dir),
        "versions": {name: metadata.version(name) for name in ("torch", "transformers", "trl", "accelerate")},
        "steps": {},
    }
    cuda = device.type == "cuda"

    def timed(name: str, run):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = run()
        if cuda:
            torch.cuda.synchronize()
        row = {"seconds": round(time.perf_counter() - start, 3)}
        if cuda:
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        report["steps"][name] = row
        return result, row

    # 1. Sampling, as generate_candidates does it.
    cand = params.candidates
    model, tokenizer = load_policy(model_dir, cand.dtype)
    report["sampling_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    (samples, stats), row = timed(
        "sampling",
        lambda: sample_completions(
            model, tokenizer, [p.text for p in prompts], num_samples=cand.k, max_new_tokens=cand.max_new_tokens,
            temperature=cand.temperature, batch_size=cand.batch_size, seed=cand.seed, desc="sampling",
        ),
    )  # fmt: skip
    row.update(samples=len(samples), tokens=stats.tokens, tokens_per_second=round(stats.tokens_per_second, 1))
    # The evaluate stage's log-likelihood pass (KL to the reference, perplexity) over the same samples.
    _, row = timed(
        "likelihood",
        lambda: response_logprobs(
            model, tokenizer, [prompts[s.prompt_index].text for s in samples], [s.token_ids for s in samples],
            temperature=cand.temperature, batch_size=params.evaluate.batch_size,
        ),
    )  # fmt: skip
    row["responses"] = len(samples)
    model = None  # free the sampling model before the reward model and PPO load theirs

    # 2. Rankings from the simulated annotators, then the reward model.
    candidates = work / "candidates"
    BundleFolder(candidates).write_candidates(prompts, to_completions(prompts, samples, "device-check", cand.seed))
    bundle = simulated_bundle(candidates, params.labeling)
    preferences = work / "preferences"
    write_outputs(preferences, bundle, bundle_pairs(bundle, margin="rank_distance"))
    groups = load_prompt_comparisons(preferences, reward_cfg.margin)
    fit, row = timed("reward_training", lambda: fit_reward_model(model_dir, reward_cfg, groups, work / "reward-trainer"))
    row.update(pairs=num_pairs(groups), steps=fit.steps, dtype=reward_cfg.dtype,
               train_loss_last=fit.losses[-1][1] if fit.losses else None)  # fmt: skip
    reward = RewardModel(fit.model, fit.tokenizer, reads_stop_token=reward_cfg.read_stop_token, dtype=reward_cfg.dtype)
    reward.save(work / "reward")
    reward = RewardModel.load(work / "reward")
    texts = [s.text for s in samples]
    owners = [prompts[s.prompt_index].text for s in samples]
    done = [s.finished for s in samples]
    _, row = timed("reward_scoring", lambda: reward.score(owners, texts, done, batch_size=reward_cfg.score_batch_size))
    row.update(responses=len(texts), responses_per_second=round(len(texts) / max(row["seconds"], 1e-9), 1))

    # 3. PPO against it.
    def score_fn(p, r, f):
        return reward.score(p, r, f, batch_size=ppo_cfg.batch_size)

    trainer, row = timed("ppo_build", lambda: build_trainer(ppo_cfg, model_dir, score_fn, [p.text for p in prompts]))
    row["dtype"] = ppo_cfg.dtype
    times, peaks, kls = [], [], []
    for _ in range(args.updates):
        metrics, row = timed("ppo_update", trainer.step)
        times.append(row["seconds"])
        peaks.append(row.get("peak_gib", 0.0))
        kls.append(metrics["ppo/kl"])
    timed_updates = times[1:] or times
    report["steps"]["ppo_update"] = {
        "updates": args.updates, "episodes_per_update": ppo_cfg.batch_size, "mode": ppo_cfg.mode,
        "median_seconds": round(statistics.median(timed_updates), 3), "first_seconds": times[0],
        "peak_gib": max(peaks) if cuda else None, "final_kl": round(kls[-1], 4),
        "episodes_per_second": round(ppo_cfg.batch_size / statistics.median(timed_updates), 2),
    }  # fmt: skip

    print(f"device: {report['device']} ({device.type}); model: {report['model']}")
    print("| step | seconds | figures |\n| --- | --- | --- |")
    for name, row in report["steps"].items():
        seconds = row.get("median_seconds", row.get("seconds"))
        figures = ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("seconds", "median_seconds"))
        print(f"| {name} | {seconds} | {figures} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
