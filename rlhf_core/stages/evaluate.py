"""Stage ``evaluate``: is the candidate better than the reference and the champion, and did it game its reward model?

Samples the candidate (``paths.policy``), the reference (the starting policy: the SFT model when sft is on, else ``paths.base_model``)
and the champion (``evaluate.champion``, a version the flow resolved), ``evaluate.samples_per_prompt`` responses each
to the first ``evaluate.num_prompts`` held-out eval prompts, scores every response with the proxy and (simulated
labelling) the gold function, and writes:

* ``metrics/evaluate.json`` - win rates (every response of a prompt against
  each of the other policy's to it) with 95% intervals, KL, lengths,
  diversity, perplexity, the best-of-n frontier, the over-optimisation check
  and every gate's value, threshold and verdict;
* ``<paths.evaluation>/`` - ``summary.json`` (read by ``promote``),
  ``samples.jsonl``, ``plot_data/*.csv`` and, for human evaluation, a blind
  labelling task in ``human_eval/``;
* ``<paths.plots>/`` - gold_vs_kl.png, ppo_curves.png, lengths.png.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from pathlib import Path

from rlhf_core import precision, tracking
from rlhf_core.artifacts import EVALUATION_PLOTS, EvaluationFolder, Layout
from rlhf_core.config import EvaluateConfig, Params
from rlhf_core.errors import DataError
from rlhf_core.evaluation.best_of_n import FrontierPoint, frontier
from rlhf_core.evaluation.gates import Evidence, Judged, apply_gates, gate_metrics
from rlhf_core.evaluation.human_eval import blind_task, human_win_rates, write_task
from rlhf_core.evaluation.metrics import WinRate, perplexity
from rlhf_core.evaluation.overoptimisation import assess, gold_trend, paired_gain
from rlhf_core.evaluation.plots import PolicyPoint, plot_lengths, plot_ppo_curves, plot_reward_vs_kl, write_plot_data
from rlhf_core.evaluation.report import Responses, compare, length_ratio, policy_metrics, win_rate_metrics
from rlhf_core.evaluation.sampling import EvalSamples, sample_policies
from rlhf_core.evaluation.scoring import Scorer
from rlhf_core.evaluation.summary import EvaluationSummary
from rlhf_core.preferences import PreferenceBundle
from rlhf_core.records import read_jsonl, write_jsonl
from rlhf_core.reward.release import RewardRelease, handed_over
from rlhf_core.schemas import Prompt

def load_eval_prompts(path: Path, limit: int) -> list[Prompt]:
    """The first ``limit`` held-out prompts (the split is fixed by the prompts stage's seed)."""
    prompts = read_jsonl(path, Prompt)[:limit]
    if not prompts:
        raise DataError(f"{path}: no eval prompts (run `rlhf prompts` first)")
    return prompts


def candidate_version(ppo_metrics: dict) -> str | None:
    """The rlhf-policy version the PPO stage registered (None when the policy folder is not a registered version)."""
    version = ppo_metrics.get("ppo/registered_version")
    return None if version is None else str(version)


def champion_to_beat(cfg: EvaluateConfig, candidate: str | None) -> tracking.ModelRef | None:
    """The champion named by ``evaluate.champion`` (a version the flow resolved from the alias), or None.

    None also when it is the candidate itself.  The stage never reads the alias:
    it would move under a finished run and make its metrics unreproducible.
    """
    if cfg.champion == "none" or cfg.champion == candidate:
        return None
    ref = tracking.model_version(tracking.POLICY_MODEL, cfg.champion)
    if ref is None:
        raise DataError(f"evaluate.champion: {tracking.POLICY_MODEL} has no version {cfg.champion!r}")
    return ref


def handed_over_reward(params: Params, ppo_metrics: dict) -> RewardRelease:
    """The reward model train_reward handed over, checked to be the one the candidate was trained against."""
    release = handed_over(params.paths.reward_release, params.paths.reward_model)
    trained_against = ppo_metrics.get("ppo/reward_model_hash")
    if trained_against is not None and trained_against != release.content_hash:
        raise DataError(
            f"{params.paths.policy} was trained against reward model content {trained_against}, but "
            f"{params.paths.reward_model} is {release.label}: run `dvc repro` so that ppo uses it"
        )
    return release


def _pools(first: list[float], extra: list[float], sampled: EvalSamples, size: int) -> list[list[float]]:
    """Per best-of-n prompt, ``size`` scores: those of the reference's eval responses, then those of its extra
    samples."""
    pools, at, k = [], 0, sampled.samples_per_prompt
    for p, pool in enumerate(sampled.reference_extra):
        pools.append([*first[p * k : (p + 1) * k], *extra[at : at + len(pool)]][:size])
        at += len(pool)
    return pools


def _scored(scorer: Scorer, prompts: list[str], sampled: EvalSamples, pool_size: int):
    """Responses of every policy, and the best-of-n pools' proxy (and gold) scores per prompt."""
    extra = [s for pool in sampled.reference_extra for s in pool]
    # One proxy pass over every policy's responses and the pools: the responses to one prompt read it once.
    lists = [sampled.candidate, sampled.reference, extra] + ([sampled.champion] if sampled.champion else [])
    proxy = scorer.proxy_lists(prompts, lists, sampled.trunk_layers)
    k = sampled.samples_per_prompt
    candidate = scorer.responses("candidate", prompts, sampled.candidate, proxy[0], k)
    reference = scorer.responses("reference", prompts, sampled.reference, proxy[1], k)
    champion = scorer.responses("champion", prompts, sampled.champion, proxy[3], k) if sampled.champion else None
    proxy_pools = _pools(reference.proxy, proxy[2], sampled, pool_size)
    extra_gold = scorer.gold(prompts, extra)
    gold_pools = _pools(reference.gold, extra_gold, sampled, pool_size) if extra_gold is not None else None
    return candidate, reference, champion, proxy_pools, gold_pools


def likelihood_metrics(sampled: EvalSamples) -> dict[str, float]:
    """Sequence-level KL(candidate || reference) over all the candidate's responses, and their perplexity under the
    reference."""
    tokens = sum(s.num_tokens for s in sampled.candidate)
    return {
        "eval/kl": statistics.fmean(sampled.kl),
        "eval/kl_std": statistics.pstdev(sampled.kl),
        "eval/perplexity": perplexity(sum(sampled.candidate_ref_logprob), tokens),
    }


def sample_metrics(sampled: EvalSamples, policies: list[Responses], repetition_ngram: int) -> dict[str, float]:
    """KL, perplexity, length ratio, per-policy description and the candidate's win rates."""
    candidate, reference = policies[0], policies[1]
    metrics = {**likelihood_metrics(sampled), "eval/length_ratio": length_ratio(candidate, reference)}
    for policy in policies:
        metrics.update(policy_metrics(policy, repetition_ngram))
    for other in policies[1:]:
        metrics.update(win_rate_metrics(candidate, other))
    return metrics


def frontier_metrics(points: list[FrontierPoint]) -> dict[str, float]:
    """``eval/best_of_n/<n>/{kl,proxy,gold}`` and ``gold_gain`` (over one reference sample, on the pool prompts) with
    ``_low``/``_high`` (95%)."""
    metrics = {}
    for point in points:
        metrics[f"eval/best_of_n/{point.n}/kl"] = point.kl
        metrics[f"eval/best_of_n/{point.n}/proxy"] = point.proxy
        if point.gold is not None:
            metrics[f"eval/best_of_n/{point.n}/gold"] = point.gold
        if point.gold_gain is not None:
            metrics[f"eval/best_of_n/{point.n}/gold_gain"] = point.gold_gain
        if point.gold_gain_interval is not None:
            low, high = point.gold_gain_interval
            metrics.update({f"eval/best_of_n/{point.n}/gold_gain_low": low, f"eval/best_of_n/{point.n}/gold_gain_high": high})
    return metrics


def overoptimisation_metrics(
    candidate: Responses, reference: Responses, ppo_rows: list[dict], tolerance: float, probe_rows: list[dict] = ()
):
    """``eval/overopt/...``: proxy gain next to gold gain (per prompt: the mean of its responses), the PPO run's gold
    trend, and the verdict."""
    proxy_gain = paired_gain(candidate.prompt_means(candidate.proxy), reference.prompt_means(reference.proxy))
    gold_gain = None
    if candidate.gold is not None and reference.gold is not None:
        gold_gain = paired_gain(candidate.prompt_means(candidate.gold), reference.prompt_means(reference.gold))
    trend = gold_trend(ppo_rows, probe_rows)
    verdict = assess(proxy_gain, gold_gain, trend, tolerance)
    metrics: dict[str, object] = {
        "eval/overopt/proxy_gain": proxy_gain.mean,
        "eval/overopt/proxy_gain_low": proxy_gain.low,
        "eval/overopt/proxy_gain_high": proxy_gain.high,
        "eval/overopt/flagged": verdict.flagged,
    }
    if gold_gain is not None:
        metrics.update({"eval/overopt/gold_gain": gold_gain.mean, "eval/overopt/gold_gain_low": gold_gain.low,
                        "eval/overopt/gold_gain_high": gold_gain.high})
    if trend is not None:
        metrics.update({f"eval/overopt/ppo_gold_{k}": getattr(trend, k) for k in ("first", "peak", "last")})
        metrics.update({"eval/overopt/ppo_gold_peak_update": trend.peak_update, "eval/overopt/ppo_gold_points": trend.points})
        if (worst := trend.worst) is not None:  # the paired test's closest call: drop from that probe, its bound
            metrics.update({"eval/overopt/ppo_gold_drop": worst.mean, "eval/overopt/ppo_gold_drop_low": worst.low,
                            "eval/overopt/ppo_gold_drop_update": worst.update})
    if verdict.reasons:
        metrics["eval/overopt/reasons"] = "; ".join(verdict.reasons)
    return metrics, verdict


def judged(candidate: Responses, other: Responses | None, human: dict[str, WinRate]) -> Judged | None:
    """The win rate a gate uses: gold if known, else returned human labels; never the proxy."""
    if other is None:
        return None
    if candidate.gold is not None and other.gold is not None:
        return Judged(compare(candidate, other, "gold"), "gold")
    if other.name in human:
        return Judged(human[other.name], "human")
    return Judged(None, "none")


def human_evaluation(cfg: EvaluateConfig, params: Params, prompts: list[Prompt], policies: list[Responses], salt: str):
    """Export the blind task when asked for, and the human win rates from any returned labels."""
    with_gold = policies[0].gold is not None
    if cfg.human_eval == "never" or (cfg.human_eval == "auto" and with_gold):
        return {}, {}
    task = blind_task(prompts, {r.name: r.firsts(r.texts) for r in policies}, salt=salt, seed=cfg.seed)  # one each
    folder = write_task(task, Layout(params.paths).evaluation.human_eval)
    rankings = PreferenceBundle.read(params.paths.label_export).rankings
    rates = human_win_rates(rankings, task.key)
    metrics: dict[str, object] = {"eval/human/task": str(folder), "eval/human/items": len(prompts)}
    for opponent, rate in rates.items():
        metrics.update(rate.as_metrics(f"eval/human_win_rate_vs_{opponent}"))
    return metrics, rates


def lineage(params: Params, version: str | None, release: RewardRelease, eval_file: Path) -> dict[str, str]:
    """Where the candidate came from: what promotion writes onto the registry version."""
    ref = tracking.model_version(tracking.POLICY_MODEL, version) if version else None
    return {
        "candidate_version": version or "",
        "ppo_run_id": (ref.run_id or "") if ref else "",
        "reward_model_version": release.version,
        "reward_model_hash": release.content_hash,
        "preference_data_hash": tracking.hash_paths([params.paths.preferences]),
        "eval_prompts_hash": tracking.hash_paths([eval_file]),
        "labeling_backend": params.labeling.backend,
        "git_commit": tracking.git_commit(),
    }


def write_samples(path: Path, prompts: list[Prompt], sampled: EvalSamples, policies: list[Responses]) -> None:
    """Every policy's eval responses with their scores, one JSON line each (``sample``: which of the prompt's)."""
    rows = []
    for policy in policies:
        source = {"candidate": sampled.candidate, "reference": sampled.reference, "champion": sampled.champion}[policy.name]
        for sample, proxy, gold in zip(source, policy.proxy, policy.gold or [None] * len(policy.proxy)):
            rows.append({"policy": policy.name, "prompt_id": prompts[sample.prompt_index].id, "sample": sample.sample_index, "text": sample.text,
                         "num_tokens": sample.num_tokens, "finished": sample.finished, "proxy": proxy, "gold": gold})
    write_jsonl(path, rows)


def draw(plots: Path, out: Path, points: list[FrontierPoint], policies: list[Responses], metrics: dict, ppo_rows, max_new_tokens: int):
    """The PNG figures in ``plots`` and the numbers behind them in ``out/plot_data``; returns the figures."""
    kl = {"candidate": metrics["eval/kl"], "reference": 0.0, "champion": None}  # the champion's KL is not measured
    policy_points = [
        PolicyPoint(r.name, kl[r.name], statistics.fmean(r.proxy), statistics.fmean(r.gold) if r.gold else None)
        for r in policies
    ]
    lengths = {r.name: r.lengths for r in policies}
    write_plot_data(EvaluationFolder(out).plot_data, points, policy_points, lengths)
    return [
        plot_reward_vs_kl(points, policy_points, ppo_rows, plots / EVALUATION_PLOTS["reward_vs_kl"]),
        plot_ppo_curves(ppo_rows, plots / EVALUATION_PLOTS["ppo"]),
        plot_lengths(lengths, max_new_tokens, plots / EVALUATION_PLOTS["lengths"]),
    ]


def _finite(metrics: dict) -> dict:
    """Drop infinite interval ends (too few prompts): JSON and MLflow cannot hold them."""
    return {k: v for k, v in metrics.items() if not (isinstance(v, float) and not math.isfinite(v))}


def run(params: Params) -> dict:
    paths, cfg = params.paths, params.evaluate
    layout = Layout(paths)
    out = layout.evaluation
    eval_file = layout.prompts.eval
    inputs = [eval_file, layout.metrics.detail("ppo"), paths.reward_release]
    with tracking.stage_run("evaluate", metrics_dir=paths.metrics, config_sections=[cfg, params.gates], inputs=inputs) as stage:
        stage.log_params({"evaluate": cfg.model_dump(), "gates": params.gates.model_dump()})
        prompts = load_eval_prompts(eval_file, cfg.num_prompts)
        texts = [p.text for p in prompts]
        ppo_metrics = layout.metrics.read("ppo")
        version = candidate_version(ppo_metrics)
        release = handed_over_reward(params, ppo_metrics)
        champion_ref = champion_to_beat(cfg, version)
        reference = layout.starting_policy.require()  # what PPO started from and measured its KL against
        with_gold = params.labeling.backend == "simulated"
        scorer = Scorer(paths.reward_model, with_gold=with_gold, batch_size=cfg.batch_size)
        # Samples keep the states of the lower layers they share with the reward model (when it scores in fp32).
        sampled = sample_policies(texts, Path(paths.policy), reference, champion_ref and champion_ref.path, cfg, scorer.trunk)
        from rlhf_core.decoder import sampling_record

        numeric_path = {
            **sampling_record("eval", cfg.dtype, precision.default_device()), "eval/reward_dtype": scorer.model.dtype,
            "eval/trunk_layers_shared": sampled.trunk_layers,
        }
        stage.log_params({**numeric_path, "eval/reference": layout.starting_policy.kind})
        candidate, reference, champion, proxy_pools, gold_pools = _scored(scorer, texts, sampled, cfg.pool_size)
        policies = [r for r in (candidate, reference, champion) if r is not None]
        points = frontier(proxy_pools, gold_pools, cfg.best_of_n)
        ppo_rows = layout.ppo_curve.read()
        overopt, verdict = overoptimisation_metrics(
            candidate, reference, ppo_rows, params.gates.gold_drop_tolerance, layout.ppo_gold_probe.read()
        )
        salt = hashlib.sha256(f"{version}|{cfg.seed}|{candidate.texts}".encode()).hexdigest()
        human, human_rates = human_evaluation(cfg, params, prompts, policies, salt)

        metrics: dict[str, object] = {
            "eval/candidate_version": version,
            "eval/champion_version": champion_ref.version if champion_ref else None,
            "eval/reward_model_version": release.version,
            "eval/reward_model_hash": release.content_hash,
            "eval/num_prompts": len(prompts),
            "eval/tokens_per_second": sampled.tokens / max(sampled.seconds, 1e-9),
            **numeric_path,
            **sample_metrics(sampled, policies, cfg.repetition_ngram),
            **frontier_metrics(points),
            **overopt,
            **human,
        }
        evidence = Evidence(
            vs_reference=judged(candidate, reference, human_rates),
            vs_champion=judged(candidate, champion, human_rates),
            kl=metrics["eval/kl"],
            length_ratio=metrics["eval/length_ratio"],
            distinct_2=metrics["eval/candidate/distinct_2"],
            repetition_rate=metrics["eval/candidate/repetition_rate"],
            overoptimisation=verdict,
            reward_accuracy=release.heldout_accuracy,
        )
        gates = apply_gates(evidence, params.gates)
        metrics = _finite({**metrics, **gate_metrics(gates)})

        write_samples(out.samples, prompts, sampled, policies)
        figures = draw(Path(paths.plots), out.folder, points, policies, metrics, ppo_rows, cfg.max_new_tokens)
        EvaluationSummary(
            candidate_version=version,
            champion_version=champion_ref.version if champion_ref else None,
            gates=gates,
            lineage=lineage(params, version, release, eval_file),
            metrics=metrics,
            frontier=points,
        ).write(out.summary)
        for figure in figures:
            stage.log_artifact(figure, "plots")
        stage.log_artifact(out.folder, "evaluation")
        return stage.finish(metrics)
