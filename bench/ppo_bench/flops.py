"""How many FLOPs a PPO update's training step does, and how many this machine can do.

The count is the usual 2 x parameters x tokens per forward pass of a linear
layer (a multiply and an add per weight per token; Kaplan et al. 2020,
appendix; Chinchilla's 6ND for forward + backward), applied only to the layers
a pass really runs:

* forward: ``2 * P * T`` for P weights run over T tokens;
* backward: ``2 * (2 * P * T)`` (input gradient + weight gradient) for weights
  that train, ``2 * P * T`` (input gradient only) for frozen weights the
  gradient must pass through (the frozen LM head above trainable layers, the
  frozen base weights under LoRA), nothing for frozen layers below every
  trainable one.

Decoder layers run over each row's own positions: the trainer's passes cut a
batch's left padding by running rows of similar length together
(``rlhf_core.ppo.policy.length_groups``; the little padding a group keeps is
not counted).  The LM head runs over the response positions only, since that
is all the trainer asks of it.  The old-policy pass is counted only where it
runs: with ``ppo.dtype: float32`` the sampler is the old policy and its
log-probs (and values, from a value head on the policy) stand in for that pass
(a separate value model still runs, alone), and with one minibatch the first
training pass is the old-policy pass.  Attention's score and weighted-sum products
(``4 * L * hidden`` per token and layer, ~3% here) and all element-wise work are
left out, so the figure is a slight under-estimate of the work done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderShape:
    """Weight counts of a decoder-only LM: one decoder layer, the number of layers, the LM head."""

    layer_params: int
    num_layers: int
    head_params: int

    @classmethod
    def of_actor_critic(cls, policy) -> "DecoderShape":
        """Read off ``rlhf_core.ppo.policy.ActorCritic.parts`` (base weights only: LoRA adapters are tiny)."""
        layer = policy.parts.layers[0]
        layer_params = sum(p.numel() for name, p in layer.named_parameters() if "lora_" not in name)
        return cls(layer_params, len(policy.parts.layers), policy.parts.lm_head.weight.numel())


@dataclass(frozen=True)
class PassSizes:
    """Token counts of one update: ``batch`` rows of ``seq_len`` positions, ``n_response`` of which predict the
    response; ``tokens`` of them the rows' own (the rest left padding; all when not given); ``old_pass``: whether
    the old-policy pass runs (else the sampler's numbers stand in for it)."""

    batch: int
    seq_len: int
    n_response: int
    tokens: int | None = None
    old_pass: bool = True


def backward_factor(trains: bool, on_gradient_path: bool) -> int:
    """Backward cost in forward passes: 2 for trained weights, 1 for frozen weights the gradient crosses, else 0."""
    return 2 if trains else 1 if on_gradient_path else 0


def ppo_training_flops(
    shape: DecoderShape, sizes: PassSizes, *, mode: str, trunk_layers: int, separate_value: bool, ppo_epochs: int
) -> int:
    """Matmul FLOPs of one update's training step in ``rlhf_core.ppo``: the no-grad experience passes (reference,
    old policy where it runs, separate value model) and ``ppo_epochs`` forward+backward passes over the batch.

    The frozen trunk (the lower ``trunk_layers`` layers) is not counted: the rollout already computed its
    hidden states and the later passes reuse them.  In ``full`` mode the trunk is empty.
    """
    tokens = sizes.batch * sizes.seq_len if sizes.tokens is None else sizes.tokens
    layers_fwd = 2 * shape.layer_params * (shape.num_layers - trunk_layers) * tokens
    head_fwd = 2 * shape.head_params * sizes.batch * sizes.n_response
    value_fwd = layers_fwd if separate_value else 0

    # reference, old policy (unless the sampler stood in for it), and the value model if separate
    experience = (layers_fwd + head_fwd) * (2 if sizes.old_pass else 1) + value_fwd

    layers_back = backward_factor(trains=mode in ("full", "freeze"), on_gradient_path=True)
    head_back = backward_factor(trains=mode == "full", on_gradient_path=True)  # tied to the (frozen unless full) embeddings
    value_back = backward_factor(trains=mode != "lora", on_gradient_path=True)  # under LoRA only its adapters train
    one_epoch = (1 + layers_back) * layers_fwd + (1 + head_back) * head_fwd + (1 + value_back) * value_fwd
    return experience + ppo_epochs * one_epoch


def matmul_peak_flops(dtype_name: str, size: int = 2048, repeats: int = 10) -> float:
    """Best FLOP/s of a ``size`` x ``size`` matmul in ``dtype_name`` over ``repeats`` tries (after two warm-ups)."""
    import torch

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
