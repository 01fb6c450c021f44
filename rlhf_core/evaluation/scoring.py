"""Score sampled responses with the proxy (the trained reward model) and, when it exists, the gold function."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rlhf_core.evaluation.report import Responses
from rlhf_core.generation import Sample
from rlhf_core.gold import gold_score


class Scorer:
    """The reward model, loaded once; ``with_gold`` adds gold scores (simulated labelling only).

    It scores in its own ``reward.dtype``, the path its normalisation was fitted in, not in ``evaluate.dtype``.
    """

    def __init__(self, reward_model: str | Path, *, with_gold: bool, batch_size: int):
        from rlhf_core.reward import RewardModel

        from rlhf_core.reward.trunk import RolloutTrunkScorer

        self.model = RewardModel.load(reward_model)
        self.with_gold = with_gold
        self.batch_size = batch_size
        self.trunk = RolloutTrunkScorer.trunk_of(self.model)  # the decoder samplers may share layers with, or None

    def proxy(self, prompts: Sequence[str], samples: Sequence[Sample], trunk_layers: int = 0) -> list[float]:
        """Normalised reward-model scores (the reference's responses score mean 0, std 1).  With ``trunk_layers``, the
        number of lower layers the samplers share with the reward model, samples that kept their hidden states
        after them (``Sample.trunk``) are scored from those (:class:`rlhf_core.reward.trunk.RolloutTrunkScorer`)."""
        if not samples:
            return []
        args = ([prompts[s.prompt_index] for s in samples], [s.text for s in samples], [s.finished for s in samples])
        if trunk_layers and self.trunk is not None and any(s.trunk for s in samples):
            from rlhf_core.reward.trunk import RolloutTrunkScorer

            scores = RolloutTrunkScorer(self.model, trunk_layers, self.batch_size)(*args, sampled=[s.trunk for s in samples])
        else:
            scores = self.model.score(*args, batch_size=self.batch_size)
        return [float(x) for x in scores.tolist()]

    def proxy_lists(self, prompts: Sequence[str], lists: Sequence[Sequence[Sample]], trunk_layers: int = 0) -> list[list[float]]:
        """:meth:`proxy` of several lists of samples (e.g. several policies' responses) in one pass, so that the
        responses to one prompt read the prompt once (:func:`rlhf_core.decoder.shared_prefix_groups`)."""
        scores = self.proxy(prompts, [s for samples in lists for s in samples], trunk_layers)
        out, at = [], 0
        for samples in lists:
            out.append(scores[at : at + len(samples)])
            at += len(samples)
        return out

    def gold(self, prompts: Sequence[str], samples: Sequence[Sample]) -> list[float] | None:
        if not self.with_gold:
            return None
        return [gold_score(prompts[s.prompt_index], s.text) for s in samples]

    def responses(
        self, name: str, prompts: Sequence[str], samples: Sequence[Sample], proxy: list[float] | None = None,
        samples_per_prompt: int = 1,
    ) -> Responses:  # fmt: skip
        """One policy's scored responses (``samples``: ``samples_per_prompt`` per prompt, in prompt order; ``proxy``:
        their :meth:`proxy` scores when already computed)."""
        if len(samples) != len(prompts) * samples_per_prompt:
            raise ValueError(f"{name}: {len(samples)} responses for {len(prompts)} prompts x {samples_per_prompt}")
        return Responses(
            name=name,
            texts=[s.text for s in samples],
            token_ids=[list(s.token_ids) for s in samples],
            finished=[s.finished for s in samples],
            proxy=self.proxy(prompts, samples) if proxy is None else proxy,
            gold=self.gold(prompts, samples),
            samples_per_prompt=samples_per_prompt,
        )
