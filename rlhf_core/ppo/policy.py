"""The models PPO trains: policy, value function and frozen reference around one causal LM.

A decoder-only LM is split at a *trunk*: the token embeddings plus the lower
``ppo.freeze_layers`` decoder layers.  The cost modes (``ppo.mode``) decide what
trains and what the reference is:

* ``full``  - every weight trains (no trunk is frozen); the reference is a frozen
  copy of the whole model.
* ``freeze`` - the trunk and the LM head stay frozen, the layers above it and the
  final norm train; the reference is a frozen copy of those upper layers only.
* ``lora``  - LoRA adapters (peft) on the layers above the trunk; the reference is
  the same weights with the adapters switched off, so there is one copy.

When the trunk is frozen, its output is the same for the policy before and after
every update, for the reference and for a separate value model: the rollout keeps
the trunk's hidden states from sampling and every later pass starts from them
(see :mod:`rlhf_core.ppo.rollout`).  With 24 of SmolLM2's 30 layers frozen, the
reference, old-policy, value and training passes run 6 layers instead of 30.

Those passes run the rows of a batch in groups of similar length
(:func:`length_groups`) instead of the batch left-padded to its longest query
(a third of it padding on the default prompts), and the heads once over the
joined final states.  For Llama layers the groups are packed into one tensor
(:func:`rlhf_core.decoder.run_packed`): each weight multiplies every group's
positions in one product, attention runs group by group.  In fp32 the sampler runs the old policy's own weights, so
its log-probs, entropies and values (``value_model: head``) stand in for the
old-policy pass, which then does not run (:attr:`ActorCritic.samples_as_old_policy`).

The value function is a scalar head on the policy's last hidden state
(``value_model: head``, one forward for both) or a model of its own
(``separate``: a trainable copy of the layers above the trunk with a head).

With ``ppo.dtype: bfloat16`` (:mod:`rlhf_core.precision`), weights stay fp32 and
the passes over whole sequences (reference, old policy, training) run under
bf16 autocast; rollouts sample from a bf16 copy of the weights, refreshed before
each rollout (:class:`rlhf_core.ppo.rollout.PolicyStep`), since autocast would
re-cast every weight at every one-token decode step.  Log-probs and values are
always computed in fp32 from the final hidden states.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_core.base_model import frozen_layers
from rlhf_core.config import PPOConfig
from rlhf_core.decoder import Block, DecoderParts, decoder_parts, packs_layers, prefill_groups, run_packed
from rlhf_core.errors import RLHFError
from rlhf_core.generation import left_padding, positions_from_mask
from rlhf_core import precision

#: Linear layers of a Llama-style decoder layer that LoRA adapts.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------- pieces of a decoder-only LM


@dataclass
class Attention:
    """What every decoder layer of one pass needs besides the hidden states: mask and rotary embeddings."""

    mask: object
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    position_ids: torch.Tensor


def attention_inputs(parts: DecoderParts, hidden, attention_mask, position_ids, cache=None) -> Attention:
    """Build the mask before any layer writes this step into ``cache`` (its length sizes the mask)."""
    from transformers.masking_utils import create_causal_mask

    mask = create_causal_mask(
        config=parts.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=cache, position_ids=position_ids
    )
    return Attention(mask, parts.rotary(hidden, position_ids=position_ids), position_ids)


def run_layers(layers, hidden: torch.Tensor, attention: Attention, cache=None) -> torch.Tensor:
    for layer in layers:
        hidden = layer(
            hidden,
            attention_mask=attention.mask,
            position_embeddings=attention.position_embeddings,
            position_ids=attention.position_ids,
            cache=cache,
        )
    return hidden


def fp32_linear(hidden: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(hidden)`` in fp32 whatever autocast says: log-probs and values need the precision.  fp32 weights and
    input go through the layer's own ``forward``, which the sampling loop's :func:`rlhf_core.decoder.skinny_linears`
    swaps for one-token steps (the LM head is a fifth of the weights a step reads)."""
    with torch.autocast(hidden.device.type, enabled=False):
        if type(layer) is nn.Linear and hidden.dtype == layer.weight.dtype == torch.float32:
            return layer(hidden)
        bias = layer.bias.float() if layer.bias is not None else None
        return F.linear(hidden.float(), layer.weight.float(), bias)


class ValueHead(nn.Module):
    """A scalar per position read off a final hidden state, initialised to zero (lm-human-preferences)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return fp32_linear(hidden, self.linear).squeeze(-1)


# --------------------------------------------------------------------------- the actor-critic


@dataclass(frozen=True)
class PassOutput:
    logits: torch.Tensor  # (B, R, V) fp32, for the R response positions
    values: torch.Tensor  # (B, R) fp32


#: Padding share a group of rows of one sequence pass may carry, and its fewest rows (see :func:`length_groups`).
PASS_PADDING, PASS_MIN_ROWS = 0.15, 2


def length_groups(attention_mask: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """The rows of a left-padded batch in groups of similar length (:func:`rlhf_core.decoder.prefill_groups`), each
    with its first column (the group's leading all-padding columns are cut).  A rollout batch is left-padded to its
    longest query, about a third of it padding on the default prompts; every pass over it (old policy, reference,
    training) runs its groups instead, and their outputs - the last R positions, which every row has - are stacked
    back in the batch's order (:func:`in_batch_order`), so losses and gradients are those of the padded batch."""
    width = attention_mask.shape[1]
    leading = left_padding(attention_mask).tolist()
    groups = prefill_groups([width - lead for lead in leading], PASS_PADDING, PASS_MIN_ROWS)
    if len(groups) == 1:
        groups = [list(range(len(leading)))]  # one group: the batch as it is
    return [(torch.tensor(rows, device=attention_mask.device), min(leading[r] for r in rows)) for rows in groups]


def in_batch_order(groups: list[tuple[torch.Tensor, int]], outputs: list[torch.Tensor]) -> torch.Tensor:
    """Per-group outputs (rows first) stacked back in the batch's row order."""
    if len(outputs) == 1:
        return outputs[0]  # one group holds the rows in order
    return torch.cat(outputs)[torch.argsort(torch.cat([rows for rows, _ in groups]))]


def _layers_to_run(stack, trunk_hidden) -> list:
    """A stack's layers that a pass runs: the upper ones from given trunk states, else the lower ones too."""
    _, lower, upper, _ = stack
    return list(upper) if trunk_hidden is not None else [*lower, *upper]


class ActorCritic(nn.Module):
    """Policy (the LM), value function and reference; ``forward`` is the training pass.

    Registered submodules: ``lm`` (the causal LM, peft-wrapped in LoRA mode),
    ``value_head``, and where needed ``value_model`` (separate value layers) and
    ``reference`` (frozen copies).  Parameter names are therefore stable, and
    :meth:`trainable_state` is all a checkpoint needs besides the base model.
    """

    def __init__(self, lm, cfg: PPOConfig):
        super().__init__()
        self.mode, self.dtype = cfg.mode, cfg.dtype
        parts = decoder_parts(lm)
        num_layers = len(parts.layers)
        self.trunk_layers = 0 if cfg.mode == "full" else frozen_layers("ppo.freeze_layers", cfg.freeze_layers, num_layers)
        if cfg.mode == "lora":
            lm = _with_lora(lm, cfg, range(self.trunk_layers, num_layers))
            parts = decoder_parts(lm)
        self.lm = lm.eval()  # no dropout: old and new log-probs must agree before the first step
        self.parts = parts
        self._set_trainable()
        self.value_head = ValueHead(parts.config.hidden_size)
        self.separate_value = cfg.value_model == "separate"
        if self.separate_value:
            self.value_model = self._copy_upper(with_trunk=self.trunk_trainable, with_head=False)
            self.value_model.requires_grad_(True)
            if cfg.mode == "lora":  # its own adapters train, its copy of the base weights does not
                for name, p in self.value_model.named_parameters():
                    p.requires_grad_("lora_" in name)
        if cfg.mode == "full":
            self.reference = self._copy_upper(with_trunk=True, with_head=True).requires_grad_(False)
        elif cfg.mode == "freeze":
            self.reference = self._copy_upper(with_trunk=False, with_head=False).requires_grad_(False)

    # ----------------------------------------------------------------- setup

    @property
    def trunk_trainable(self) -> bool:
        return self.mode == "full"

    @property
    def samples_as_old_policy(self) -> bool:
        """Whether rollouts sample with the very weights and arithmetic of the old-policy pass (``ppo.dtype:
        float32``): the sampler's log-probs and entropies then replace that pass, and so do its values when they come
        off the same final states (``value_model: head``); a separate value model runs alone
        (:meth:`separate_values`, :class:`rlhf_core.ppo.rollout.PolicyRollout`, ``PPOTrainer._experience``)."""
        return self.dtype == "float32"

    def _set_trainable(self) -> None:
        if self.mode == "full":
            self.lm.requires_grad_(True)
        elif self.mode == "freeze":
            self.lm.requires_grad_(False)
            self.parts.layers[self.trunk_layers :].requires_grad_(True)
            self.parts.norm.requires_grad_(True)
        # lora: peft has already frozen everything but the adapters

    def _copy_upper(self, *, with_trunk: bool, with_head: bool) -> nn.ModuleDict:
        """Copies of the layers above the trunk and the final norm (and embeddings/LM head when asked), in one deepcopy
        so that tied embeddings stay tied in the copy."""
        parts, k = self.parts, self.trunk_layers
        modules = {"layers": nn.ModuleList(parts.layers[k:]), "norm": parts.norm}
        if with_trunk:
            modules.update(embed=parts.embed, trunk_layers=nn.ModuleList(parts.layers[:k]))
        if with_head:
            modules["lm_head"] = parts.lm_head
        return copy.deepcopy(nn.ModuleDict(modules))

    def sampling_copy(self):
        """The bf16 copy of the decoder that rollouts sample from with ``ppo.dtype: bfloat16``
        (:class:`rlhf_core.decoder.SamplingCopy`), made on first use and refreshed from the trained weights here."""
        from rlhf_core.decoder import SamplingCopy

        device = self.parts.embed.weight.device
        sampler = self.__dict__.get("_sampling_copy")  # a plain attribute: not a submodule, never in a checkpoint
        if sampler is None or sampler.parts.embed.weight.device != device:
            sampler = self.__dict__["_sampling_copy"] = SamplingCopy(self.parts, precision.torch_dtype(self.dtype))
        else:
            sampler.refresh()
        return sampler

    def autocast(self, tokens_per_row: int = 2):
        """``ppo.dtype``'s autocast, except that one-token decode steps on a CPU stay fp32 (see the module's docstring)."""
        device = next(self.parameters()).device
        if tokens_per_row == 1 and device.type == "cpu":
            return nullcontext()
        return precision.autocast(self.dtype, device)

    # ----------------------------------------------------------------- passes

    def trunk(self, input_ids, attention: Attention) -> torch.Tensor:
        """The policy's embeddings and lower layers: the trunk's hidden states by a fresh pass."""
        return run_layers(self.parts.layers[: self.trunk_layers], self.parts.embed(input_ids), attention)

    def sample_step(self, input_ids, attention_mask, position_ids, cache, parts=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step of sampling with a KV cache: (trunk hidden states of the new positions, the last position's final
        normed hidden state, its next-token logits).

        ``parts`` is the decoder to run: the policy's own (default, under ``ppo.dtype``'s autocast, one-token steps on a
        CPU in fp32) or a :class:`rlhf_core.decoder.SamplingCopy`'s, which runs in its own dtype.
        """
        own = parts is None
        parts = self.parts if own else parts
        with self.autocast(tokens_per_row=input_ids.shape[1]) if own else nullcontext():
            hidden = parts.embed(input_ids)
            attention = attention_inputs(parts, hidden, attention_mask, position_ids, cache)
            trunk_hidden = run_layers(parts.layers[: self.trunk_layers], hidden, attention, cache)
            hidden = run_layers(parts.layers[self.trunk_layers :], trunk_hidden, attention, cache)
            hidden = parts.norm(hidden[:, -1])
            return trunk_hidden, hidden, fp32_linear(hidden, parts.lm_head) if own else parts.lm_head(hidden).float()

    def _attention(self, input_ids, attention_mask) -> Attention:
        probe = self.parts.embed.weight.new_empty(*input_ids.shape, 1)  # mask creation reads only shape/dtype/device
        return attention_inputs(self.parts, probe, attention_mask, positions_from_mask(attention_mask))

    def _final(self, stack, input_ids, attention_mask, trunk_hidden, n_response: int) -> torch.Tensor:
        """Final normed hidden states of the last ``n_response`` positions through one ``stack``: (embeddings, lower
        layers, upper layers, norm), the embeddings and lower layers only when ``trunk_hidden`` is None."""
        embed, _, _, norm = stack
        hidden = trunk_hidden if trunk_hidden is not None else embed(input_ids)
        layers = _layers_to_run(stack, trunk_hidden)
        return norm(run_layers(layers, hidden, self._attention(input_ids, attention_mask))[:, -n_response:])

    def _policy_stack(self):
        k = self.trunk_layers
        return self.parts.embed, self.parts.layers[:k], self.parts.layers[k:], self.parts.norm

    def _copy_stack(self, copy: nn.ModuleDict):
        """The stack of a copy made by :meth:`_copy_upper` (its own trunk only where the trunk trains)."""
        return (copy.embed, copy.trunk_layers, copy.layers, copy.norm) if self.trunk_trainable else (None, [], copy.layers, copy.norm)

    def forward(self, input_ids, attention_mask, trunk_hidden, n_response: int) -> PassOutput:
        """Policy logits and values for the last ``n_response`` positions (the ones that predict the response).

        ``trunk_hidden`` comes from the rollout when the trunk is frozen; a trainable trunk is run here.  The layers
        run over groups of rows of similar length (:meth:`_over_groups`); the heads over the whole batch.
        """
        final = self._over_groups(self._policy_stack(), input_ids, attention_mask, trunk_hidden, n_response)
        value_final = final
        if self.separate_value:
            value_final = self._over_groups(self._copy_stack(self.value_model), input_ids, attention_mask, trunk_hidden, n_response)
        return PassOutput(fp32_linear(final, self.parts.lm_head), self.value_head(value_final))

    def _over_groups(self, stack, input_ids, attention_mask, trunk_hidden, n_response: int) -> torch.Tensor:
        """:meth:`_final` of one stack for each of the batch's :func:`length_groups` (its leading all-padding
        columns cut), joined back in the batch's row order."""
        groups = length_groups(attention_mask)
        layers = _layers_to_run(stack, trunk_hidden)
        if len(groups) > 1 and packs_layers(layers):
            return self._packed(stack, layers, groups, input_ids, attention_mask, trunk_hidden, n_response)
        finals = []
        with self.autocast():
            for rows, start in groups:
                if start == 0 and len(rows) == len(input_ids):
                    group = input_ids, attention_mask, trunk_hidden
                else:
                    group = input_ids[rows, start:], attention_mask[rows, start:], None if trunk_hidden is None else trunk_hidden[rows, start:]
                finals.append(self._final(stack, *group, n_response))
        return in_batch_order(groups, finals)

    def _packed(self, stack, layers, groups, input_ids, attention_mask, trunk_hidden, n_response: int) -> torch.Tensor:
        """:meth:`_over_groups` with the groups packed into one tensor (:func:`rlhf_core.decoder.run_packed`): the
        layers' weights multiply every group's positions in one product; the same numbers to float rounding."""
        embed, _, _, norm = stack
        pieces, blocks, offset = [], [], 0
        with self.autocast():
            for rows, start in groups:
                ids, mask = input_ids[rows, start:], attention_mask[rows, start:]
                attention = self._attention(ids, mask)
                blocks.append(Block(offset, *ids.shape, attention.mask, attention.position_embeddings))
                offset += ids.numel()
                pieces.append(ids.reshape(-1) if trunk_hidden is None else trunk_hidden[rows, start:].reshape(ids.numel(), -1))
            hidden = embed(torch.cat(pieces)) if trunk_hidden is None else torch.cat(pieces)
            hidden = run_packed(layers, hidden, blocks)
            finals = [hidden[b.span].view(b.rows, b.width, -1)[:, -n_response:] for b in blocks]
            return norm(in_batch_order(groups, finals))

    @torch.no_grad()
    def separate_values(self, input_ids, attention_mask, trunk_hidden, n_response: int) -> torch.Tensor:
        """The separate value model's values for the response positions, its layers alone."""
        return self.value_head(self._over_groups(self._copy_stack(self.value_model), input_ids, attention_mask, trunk_hidden, n_response))

    @torch.no_grad()
    def reference_logits(self, input_ids, attention_mask, trunk_hidden, n_response: int) -> torch.Tensor:
        """Logits of the frozen reference (the initial policy) for the response positions (layers over
        :meth:`_over_groups`, the LM head over the whole batch)."""
        if self.mode == "lora":
            with self.lm.disable_adapter():
                final = self._over_groups(self._policy_stack(), input_ids, attention_mask, trunk_hidden, n_response)
            return fp32_linear(final, self.parts.lm_head)
        final = self._over_groups(self._copy_stack(self.reference), input_ids, attention_mask, trunk_hidden, n_response)
        return fp32_linear(final, self.reference.lm_head if self.mode == "full" else self.parts.lm_head)

    # ----------------------------------------------------------------- state

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor by its stable name: with the base model, all a checkpoint needs."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        expected = {name for name, p in params.items() if p.requires_grad}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
            raise RLHFError(f"trainable weights do not match this model (missing {missing}, unexpected {extra})")
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)


def _with_lora(lm, cfg: PPOConfig, layers: range):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        layers_to_transform=list(layers),
        layers_pattern="layers",
        bias="none",
    )
    return get_peft_model(lm, config)


def build_actor_critic(path, cfg: PPOConfig, device: torch.device) -> ActorCritic:
    """Load the policy's starting weights (safetensors, fp32) and wrap them for PPO."""
    from rlhf_core.base_model import load_causal_lm

    lm = load_causal_lm(path, dtype="float32")
    return ActorCritic(lm, cfg).to(device)



def export_policy(model: ActorCritic, cfg: PPOConfig, start_path, out_dir, tokenizer) -> None:
    """Save the trained policy as a plain causal LM (safetensors, tokenizer included), replacing ``out_dir`` atomically.

    The frozen weights are taken from ``start_path``; the trained ones are
    overlaid, LoRA is merged, the value head and the reference are left out.
    """
    from rlhf_core.base_model import load_causal_lm, save_model_folder

    lm = load_causal_lm(start_path, dtype="float32")
    if cfg.mode == "lora":
        lm = _with_lora(lm, cfg, range(model.trunk_layers, len(decoder_parts(lm).layers)))
    trained = {k.removeprefix("lm."): v for k, v in model.trainable_state().items() if k.startswith("lm.")}
    unexpected = lm.load_state_dict(trained, strict=False).unexpected_keys
    if unexpected:
        raise RLHFError(f"trained weights do not fit the starting model: {unexpected[:3]}")
    if cfg.mode == "lora":
        lm = lm.merge_and_unload()
    save_model_folder(lm, tokenizer, out_dir)
