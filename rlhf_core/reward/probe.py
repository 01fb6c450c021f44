"""A linear probe as the reward head's starting point (LP-FT: Kumar et al. 2022, arXiv 2202.10054).

With a few hundred comparisons, a randomly initialised head moves little in
one epoch, and fine-tuning the layers below it against that random head mostly
memorises the training pairs.  Fitting the head first - a Bradley-Terry
logistic regression on the frozen model's last-token features, with an L2
penalty on standardised features - gives the fine-tuning a head that already
orders pairs by what the pretrained features know.  On SmolLM2-135M with ~50
training prompts this lifted held-out accuracy from chance to about 0.65.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fit_linear_head(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor,
    weight: torch.Tensor,
    l2: float,
    losses: list[float] | None = None,
) -> torch.Tensor:
    """Head weights w minimising the weighted loss -log sigmoid(w·(f_c - f_r) - margin) + l2·|w ⊙ std(f)|².

    Features are standardised per dimension for the fit (so ``l2`` does not
    depend on their scale); the returned w applies to the raw features.
    ``losses``, when given, receives the pairs' loss (without the penalty) at
    every evaluation of the optimiser: the probe's training curve.
    """
    chosen, rejected = chosen.double(), rejected.double()
    scale = torch.cat([chosen, rejected]).std(0).clamp(min=1e-6)
    x = (chosen - rejected) / scale
    margin, weight = margin.double(), weight.double() / weight.sum()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        data = -(weight * F.logsigmoid(x @ w - margin)).sum()
        loss = data + l2 * w.pow(2).sum()
        loss.backward()
        if losses is not None:
            losses.append(float(data.detach()))
        return loss

    optimizer.step(closure)
    return (w.detach() / scale).float()
