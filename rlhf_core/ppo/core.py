"""The arithmetic of PPO for language models, as pure functions of tensors.

Shapes: ``B`` sequences, ``R`` response tokens, ``V`` vocabulary.  Every
per-token tensor comes with a ``mask`` (1 for real response tokens up to and
including the stop token, 0 for padding after it) and every mean is a masked
mean, so padding never moves a statistic.

Sources: Ziegler et al. 2019 (reward = score - beta*KL per token), Schulman et
al. 2016 (GAE) and 2017 (clipped objective), and "The N implementation details
of RLHF with PPO" (Huang et al. 2024, arXiv 2403.17031) for the details that
make it work: temperature-scaled log-probs, the EOS trick, whitening.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------- masked statistics


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1 (over everything, or along ``dim``)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of the masked entries (Bessel's correction, as in lm-human-preferences)."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    var = masked_mean((values - mean) ** 2, mask)
    return var * count / (count - 1) if count > 1 else var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Scale the masked entries to unit variance (and zero mean unless ``shift_mean`` is False); padding stays 0.

    Rewards are whitened without shifting the mean (shifting would change which
    sequences are better than average); advantages are shifted as well.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


# --------------------------------------------------------------------------- log-probs and KL


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probability of ``tokens`` (B, R) under ``logits`` (B, R, V) at the sampling temperature.

    Dividing by the temperature used to sample makes these the log-probs of the
    distribution the tokens were actually drawn from; without it the PPO ratio is
    wrong from the first step (N implementation details, #7).
    """
    logits = logits.float() / temperature if temperature != 1.0 else logits.float()
    # gather - logsumexp avoids materialising the (B, R, V) log-softmax.
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_of(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-token entropy (B, R) of the temperature-scaled distribution."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log p(x) - log q(x) for x ~ p: unbiased for KL(p||q) but can be negative per token (Schulman 2020)."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = q(x)/p(x): unbiased, never negative, lower variance when p is close to q."""
    log_ratio = ref_logprobs - logprobs
    return log_ratio.exp() - 1 - log_ratio


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


# --------------------------------------------------------------------------- rewards


def apply_missing_eos_penalty(scores: torch.Tensor, finished: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """The EOS trick: a response that never emitted the stop token gets ``penalty`` *instead of* its score.

    Replacing (as lm-human-preferences does with ``penalty_reward_value``) rather
    than adding keeps the reward of a cut-off answer independent of what the
    reward model thinks of its truncated text.  ``None`` turns the trick off.
    """
    if penalty is None:
        return scores
    return torch.where(finished, scores, torch.full_like(scores, penalty))


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index (B,) of the last real response token of each row (0 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * mask.long()).max(dim=1).values


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token reward (B, R): ``-beta * kl`` on every response token, plus the score on the last one.

    This is the KL-penalised reward of Ziegler et al. (2019): the penalty per
    token keeps the policy near the reference, the sequence-level score arrives
    where the response ends.
    """
    rewards = -beta * kl * mask.to(kl.dtype)
    last = last_token_index(mask)
    return rewards.scatter_add(1, last.unsqueeze(1), scores.to(rewards.dtype).unsqueeze(1))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

    Returns (advantages, returns), both (B, R) and zero on padding.  Values and
    rewards after the stop token are masked to zero, so the last real token
    bootstraps from 0: the episode ends there.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


# --------------------------------------------------------------------------- losses


@dataclass(frozen=True)
class PolicyLoss:
    loss: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor


def clipped_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float
) -> PolicyLoss:
    """PPO's clipped surrogate objective (Schulman et al. 2017), as a loss to minimise.

    ``approx_kl`` is the k3 estimate of KL(old || new) over the minibatch
    (http://joschu.net/blog/kl-approx.html); ``clipfrac`` the share of tokens
    whose clipped term was the active one.
    """
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    return PolicyLoss(loss, clipfrac, approx_kl)


@dataclass(frozen=True)
class ValueLoss:
    loss: torch.Tensor
    clipfrac: torch.Tensor


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> ValueLoss:
    """Half the larger of the unclipped and clipped squared errors (the value clipping of OpenAI baselines)."""
    clipped_values = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_error > unclipped_error).float(), mask)
    return ValueLoss(loss, clipfrac)
