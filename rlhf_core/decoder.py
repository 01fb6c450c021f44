"""The layout of a decoder-only LM, its decode step, and a copy of its weights for sampling.

:func:`decoder_parts` is the one place that knows where a Llama-style causal LM
keeps its embeddings, decoder layers, final norm, rotary embedding and LM head
(Llama, Mistral, Qwen2 and SmolLM share it); PPO and the reward model split
off their frozen lower layers through it.  :class:`DecodeStep` is one step of
the project's sampling loop (:func:`rlhf_core.generation.sample_tokens`),
:class:`RecordingStep` one that also keeps the hidden states after the
lower layers (a frozen trunk's output, which a model sharing those layers
reads instead of recomputing it), :class:`SamplingCopy` the bf16 weights
that PPO's rollouts sample from, and
:func:`shared_prefix_states` runs sequences that begin alike (several answers
to one prompt) with their common prefix computed once.  :func:`reserve` gives
a KV cache room for the answer, which the steps then write in place.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache, partial

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_core.errors import RLHFError


@dataclass
class DecoderParts:
    """Handles on the modules of a Llama-style causal LM (Llama, Mistral, Qwen2 and SmolLM share the layout)."""

    embed: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    rotary: nn.Module
    lm_head: nn.Module  # a causal LM's LM head, or a sequence classifier's ``score``
    config: object


def decoder_parts(model) -> DecoderParts:
    """The parts of a causal LM or a sequence classifier on one (peft-wrapped or not); an :class:`RLHFError`
    naming the model if it has another layout."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(inner, "model", None)
    head = getattr(inner, "lm_head", None)
    head = getattr(inner, "score", None) if head is None else head
    names = ("embed_tokens", "layers", "norm", "rotary_emb")
    if body is None or not all(hasattr(body, n) for n in names) or head is None:
        raise RLHFError(
            f"{type(inner).__name__}: needs a decoder-only LM laid out like Llama "
            "(model.embed_tokens, model.layers, model.norm, model.rotary_emb, and lm_head or score)"
        )
    return DecoderParts(body.embed_tokens, body.layers, body.norm, body.rotary_emb, head, inner.config)


class DecodeStep:
    """One step of a causal LM over a KV cache: ``step(input_ids, attention_mask, position_ids, cache)`` gives the
    next-token logits of every row and appends the new positions to ``cache``.

    This one runs the model's own forward over a ``DynamicCache``, logits of the
    last position only.
    """

    def __init__(self, model, config=None):
        self.model, self.config = model, config if config is not None else model.config
        self.rows: torch.Tensor | None = None  # the batch's rows that a call runs (None: all)
        self.batch = 0

    def sampled_modules(self) -> list[nn.Module]:
        """The modules whose weights the one-token steps read (:func:`skinny_linears` swaps their linear layers)."""
        return [self.model]

    def select_rows(self, rows: torch.Tensor | None, batch: int) -> None:
        """From the next call on, the step runs only ``rows`` of the ``batch`` rows the sampling began with (None:
        all of them); a step that keeps per-call outputs keeps them over the whole batch (:meth:`whole`)."""
        self.rows, self.batch = rows, batch

    def whole(self, kept: torch.Tensor) -> torch.Tensor:
        """A per-call output over the rows the call ran, as one over the whole batch: zeros for rows not run."""
        if self.rows is None:
            return kept
        return kept.new_zeros(self.batch, *kept.shape[1:]).index_copy_(0, self.rows, kept)

    def running(self, full: torch.Tensor) -> torch.Tensor:
        """The rows of a whole-batch tensor that a call runs (the inverse of :meth:`whole`)."""
        return full if self.rows is None else full[self.rows]

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def __call__(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         use_cache=True, logits_to_keep=1)  # fmt: skip
        return out.logits[:, -1]

    def prefill(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        """The prompts' pass: like a step, but rows of very different lengths run in groups of similar length
        (:func:`prefill_groups`), each trimmed to its own width, and their caches are left-padded back into one
        batch - a left-padded prompt batch is otherwise mostly padding, and prefill is compute-bound."""
        groups = prefill_groups(attention_mask.sum(-1).tolist())
        if len(groups) == 1:
            return self(input_ids, attention_mask, position_ids, cache)
        width, parts, logits = input_ids.shape[1], [], []
        for rows in groups:
            index = torch.tensor(rows, device=input_ids.device)
            start = width - int(attention_mask[index].sum(-1).max())  # the group's leading all-padding columns
            part = self.new_cache()
            logits.append(self(input_ids[index, start:], attention_mask[index, start:], position_ids[index, start:], part))
            parts.append((start, part))
        if not all(type(layer).__name__ == "DynamicLayer" for _, part in parts for layer in part.layers):
            cache_type = type(parts[0][1].layers[0]).__name__
            raise RLHFError(f"grouped prefill needs a DynamicCache of full-attention layers, not {cache_type}")
        back = torch.argsort(torch.tensor([row for rows in groups for row in rows], device=input_ids.device))

        def join(tensors: list[torch.Tensor]) -> torch.Tensor:
            """One (..., T, d) tensor per group, left-padded back to the batch's width, in the batch's row order."""
            return torch.cat([F.pad(t, (0, 0, start, 0)) for (start, _), t in zip(parts, tensors)])[back]

        for layer in range(len(parts[0][1].layers)):
            cache.update(join([part.layers[layer].keys for _, part in parts]), join([part.layers[layer].values for _, part in parts]), layer)
        self.rejoin(len(groups), join, back)
        return torch.cat(logits)[back]

    def rejoin(self, groups: int, join, order: torch.Tensor) -> None:
        """After a grouped prefill: a step that keeps per-call outputs joins its last ``groups`` ones - (..., T, d)
        tensors with ``join``, one row each with ``torch.cat(...)[order]``."""

    def repeat_rows(self, times: int) -> None:
        """After the prefill, when each prompt's cache is repeated ``times`` times: repeat what the step keeps too."""


class RecordingStep(DecodeStep):
    """A :class:`DecodeStep` that also keeps, for every position it runs, the hidden state after the model's first
    ``layers`` decoder layers - the output of a frozen trunk, which a reward model or reference that shares the trunk
    reads instead of computing it again (:meth:`states`: (B, positions run, d), fp32; zeros where a row had ended
    and no longer ran)."""

    def __init__(self, model, layers: int, config=None):
        super().__init__(model, config)
        self.layers, self.chunks = layers, []

    def __call__(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         use_cache=True, logits_to_keep=1, output_hidden_states=True)  # fmt: skip
        self.chunks.append(self.whole(out.hidden_states[self.layers].float()))  # [0] is the embeddings' output
        return out.logits[:, -1]

    def rejoin(self, groups: int, join, order: torch.Tensor) -> None:
        self.chunks[-groups:] = [join(self.chunks[-groups:])]

    def repeat_rows(self, times: int) -> None:
        self.chunks = [chunk.repeat_interleave(times, dim=0) for chunk in self.chunks]

    def states(self) -> torch.Tensor:
        return torch.cat(self.chunks, dim=1)


@lru_cache(maxsize=1)
def _reserved_layer_class():
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        """A ``DynamicLayer`` whose keys and values live in buffers with room for more positions: a step writes its
        position in place (``keys``/``values`` are views of the filled part) instead of ``torch.cat`` copying the
        whole cache, every layer, every step.  Out of room, or asked for what it does not do in place, it grows by
        concatenation as a ``DynamicLayer`` does."""

        def __init__(self, layer, room: int):
            super().__init__()
            self.__dict__.update(layer.__dict__)
            self.length = layer.keys.shape[-2]
            self.buffers = [t.new_empty(*t.shape[:-2], self.length + room, t.shape[-1]) for t in (layer.keys, layer.values)]
            for buffer, t in zip(self.buffers, (layer.keys, layer.values)):
                buffer[..., : self.length, :] = t
            self._views()

        def _views(self) -> None:
            self.keys, self.values = (b[..., : self.length, :] for b in self.buffers)

        def _grow(self) -> None:  # back to a plain DynamicLayer's contiguous tensors
            self.keys, self.values = self.keys.contiguous(), self.values.contiguous()
            self.buffers = None

        def update(self, key_states, value_states, *args, **kwargs):
            new = key_states.shape[-2]
            if self.buffers is not None and self.length + new > self.buffers[0].shape[-2]:
                self._grow()
            if self.buffers is None:
                return super().update(key_states, value_states, *args, **kwargs)
            for buffer, t in zip(self.buffers, (key_states, value_states)):
                buffer[..., self.length : self.length + new, :] = t
            self.length += new
            self._views()
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.buffers is None:
                return super().batch_select_indices(indices)
            self.buffers = [b[indices, ...] for b in self.buffers]
            self._views()

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.buffers is None:
                return super().batch_repeat_interleave(repeats)
            self.buffers = [b.repeat_interleave(repeats, dim=0) for b in self.buffers]
            self._views()

        def crop(self, tokens_to_remove: int) -> None:
            if self.buffers is not None:
                self._grow()
            super().crop(tokens_to_remove)

        def reset(self) -> None:
            self.buffers = None
            super().reset()

    return ReservedLayer


def reserve(cache, positions: int) -> None:
    """Give every full-attention layer of a ``DynamicCache`` (filled by a prompt pass) room for ``positions`` more
    positions, written in place by the steps that follow; the cache otherwise behaves as before (same keys and values,
    the same bits from attention).  Layers of another kind are left as they are."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if positions <= 0 or layers is None:
        return
    for index, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys is not None and layer.keys.numel():
            layers[index] = _reserved_layer_class()(layer, positions)


#: Rows (batch x positions) up to which a decode step's fp32 linear layers on a CPU run as ``weight @ x.T``: MKL's
#: sgemm streams a weight 1.2-2.4x faster in that orientation when x has few rows, and the sampler gains 2-13% at
#: batch 8-128 (bench/README.md, ``sampling.py``); a prompt pass (hundreds of rows) keeps ``F.linear``.
SKINNY_ROWS = 128
#: Rows up to which linear layers of each weight dtype run through the compiled kernel instead, where it runs
#: (:mod:`rlhf_core.kernels`; bench/README.md, ``sampling.py``): the sampler in fp32 1.2-1.3x at batch 8-16 and even
#: at 64; in bf16 1.1-1.2x at 8-16 but 0.8x at 64, where oneDNN's bf16 dot products beat fp32 arithmetic.
KERNEL_ROWS = {torch.float32: 64, torch.bfloat16: 16}


def _skinny_linear(module: nn.Linear, gemm, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if rows > SKINNY_ROWS or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
        return F.linear(x, module.weight, module.bias)
    if gemm is not None and rows <= KERNEL_ROWS.get(module.weight.dtype, 0):
        return gemm.run(x, module.weight, module.bias)  # the weight fits: checked when the layer was swapped
    if module.weight.dtype != torch.float32:  # bf16 without the kernel: oneDNN, which gains nothing from the swap
        return F.linear(x, module.weight, module.bias)
    flat = x.reshape(rows, x.shape[-1]).t()
    out = torch.mm(module.weight, flat) if module.bias is None else torch.addmm(module.bias[:, None], module.weight, flat)
    return out.t().reshape(*x.shape[:-1], module.weight.shape[0])


@contextmanager
def skinny_linears(*models: nn.Module):
    """Within the block, the CPU ``nn.Linear`` layers of ``models`` compute a call of at most :data:`SKINNY_ROWS`
    rows without gradients - the sampling loop's one-token steps - through :mod:`rlhf_core.kernels`' compiled
    kernel (fp32 and bf16 weights, up to :data:`KERNEL_ROWS` rows, where it runs) or, for fp32 weights, as
    ``(weight @ x.T).T``, and any other call as usual.  Results agree with ``F.linear`` to rounding (another
    summation order), not bit for bit."""
    from rlhf_core import kernels

    gemm = kernels.skinny_gemm()
    modules = {id(m): m for model in models for m in model.modules() if type(m) is nn.Linear
               and m.weight.device.type == "cpu" and "forward" not in m.__dict__
               and (m.weight.dtype == torch.float32 or (gemm is not None and gemm.fits(m.weight)))}.values()  # fmt: skip
    for module in modules:
        module.forward = partial(_skinny_linear, module, gemm if gemm is not None and gemm.fits(module.weight) else None)
    try:
        yield
    finally:
        for module in modules:
            del module.forward


def sampling_record(prefix: str, name: str, device: torch.device | str) -> dict[str, str]:
    """The numeric path of a stage that samples, for its metrics and MLflow params: :func:`rlhf_core.precision.record`'s
    ``<prefix>/dtype`` and ``<prefix>/device``, and ``<prefix>/decode_linears``, how its one-token steps ran their
    linear layers (:func:`rlhf_core.kernels.decode_path`: the compiled kernel's path, ``off: <why>``, or ``torch``)."""
    from rlhf_core import kernels, precision

    return {**precision.record(prefix, name, device),
            f"{prefix}/decode_linears": kernels.decode_path(precision.torch_dtype(name), device)}  # fmt: skip


@dataclass(frozen=True)
class Block:
    """``rows`` x ``width`` positions of one pass, stored row after row from ``offset`` in a packed ``(N, hidden)``
    tensor, with the attention mask and rotary embeddings the model built for that block."""

    offset: int
    rows: int
    width: int
    mask: object
    position_embeddings: tuple[torch.Tensor, torch.Tensor]

    @property
    def span(self) -> slice:
        return slice(self.offset, self.offset + self.rows * self.width)


def packs_layers(layers) -> bool:
    """Whether :func:`run_packed` can run these decoder layers: Llama's own layer class (SmolLM2's), whose forward
    it restates.  Other layouts run through their own forward, block by block."""
    return all(type(layer).__name__ == "LlamaDecoderLayer" for layer in layers)


def run_packed(layers, hidden: torch.Tensor, blocks: list[Block]) -> torch.Tensor:
    """Llama decoder layers over several blocks of rows at once: ``hidden`` holds every block's positions packed as
    ``(N, hidden)``; the projections, norms and MLP run once over all N positions, attention block by block.

    The same arithmetic as each block through the layers' own forward, but one matmul per weight instead of one per
    block: a weight's gradient is one product over all positions, not a sum of narrow ones (full fine-tuning's PPO
    step 1.14x on 2 cores, ``bench/packed_passes.py``)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

    for layer in layers:
        attn = layer.self_attn
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
        normed = layer.input_layernorm(hidden)
        q, k, v = attn.q_proj(normed), attn.k_proj(normed), attn.v_proj(normed)
        outputs = []
        for block in blocks:
            shape = (block.rows, block.width, -1, attn.head_dim)
            qb, kb, vb = (t[block.span].view(shape).transpose(1, 2) for t in (q, k, v))
            qb, kb = apply_rotary_pos_emb(qb, kb, *block.position_embeddings)
            out, _ = interface(attn, qb, kb, vb, block.mask, dropout=attn.attention_dropout if attn.training else 0.0,
                               scaling=attn.scaling)  # fmt: skip
            outputs.append(out.reshape(block.rows * block.width, -1))
        hidden = hidden + attn.o_proj(torch.cat(outputs) if len(outputs) > 1 else outputs[0])
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden


#: Padding share a prefill group may carry before a longer row starts a new group, and the smallest group.
PREFILL_PADDING, PREFILL_MIN_ROWS = 0.25, 8


def prefill_groups(lengths: list[int], padding: float = PREFILL_PADDING, min_rows: int = PREFILL_MIN_ROWS) -> list[list[int]]:
    """Row indexes in groups of similar length, shortest first: a group grows while its padded size (rows x its
    longest row) stays within ``1 + padding`` of its real tokens, and always to ``min_rows`` rows."""
    groups: list[list[int]] = []
    current: list[int] = []
    real = 0
    for row in sorted(range(len(lengths)), key=lambda r: lengths[r]):
        grown = len(current) + 1
        if len(current) >= min_rows and grown * lengths[row] > (1 + padding) * (real + lengths[row]):
            groups.append(current)
            current, real = [], 0
        current.append(row)
        real += lengths[row]
    return groups + [current] if current else groups


class SamplingCopy:
    """The decoder's weights in another dtype, for sampling only, kept in step with the trained weights.

    ``copy.parts`` are the embeddings, layers, final norm and LM head of ``parts``
    cast to ``dtype`` (the rotary embedding is shared: its frequencies stay
    fp32).  Frozen weights are cast once; :meth:`refresh` copies the trainable
    ones (and LoRA adapters) into the copy, one cast per rollout instead of one
    per weight and decode step as autocast would do.  Not an ``nn.Module``: the
    copy never shows up among the policy's parameters or in a checkpoint.
    """

    def __init__(self, parts: DecoderParts, dtype: torch.dtype):
        import copy

        source = nn.ModuleDict({"embed": parts.embed, "layers": parts.layers, "norm": parts.norm, "lm_head": parts.lm_head})
        target = copy.deepcopy(source).to(dtype)  # one deepcopy: a tied embedding and LM head stay tied
        target.requires_grad_(False)
        self.parts = DecoderParts(target["embed"], target["layers"], target["norm"], parts.rotary, target["lm_head"], parts.config)
        pairs = zip(source.named_parameters(), target.named_parameters(), strict=True)
        self._trained = [(src, dst) for (_, src), (_, dst) in pairs if src.requires_grad]

    @torch.no_grad()
    def refresh(self) -> None:
        for src, dst in self._trained:
            dst.copy_(src)


def pad_right(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), padded on the right to the longest sequence."""
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


#: Shortest token prefix worth sharing between sequences (a shared system-prompt header alone is not).
MIN_SHARED_PREFIX = 16


def shared_prefix_groups(sequences: list[list[int]], min_prefix: int = MIN_SHARED_PREFIX) -> list[tuple[int, list[int]]]:
    """``(prefix length, row indexes)`` for sequences that begin with the same tokens, e.g. several responses to one
    prompt; every other row is a group of its own with prefix 0.

    Rows are taken in lexicographic order, so rows with a common start are
    neighbours; a row joins the group before it when the tokens it then skips
    outweigh those the group's other rows must recompute because the shared
    prefix shrinks.  A prefix always leaves each row at least one token of its
    own (the position a reward head reads).
    """
    groups: list[tuple[int, list[int]]] = []
    prefix, rows = 0, []
    for row in sorted(range(len(sequences)), key=lambda r: sequences[r]):
        seq = sequences[row]
        if rows:
            shared = min(prefix, len(os.path.commonprefix([sequences[rows[0]], seq])), len(seq) - 1)
            cap = shared if len(rows) > 1 else min(shared, len(sequences[rows[0]]) - 1)
            if cap >= min_prefix and cap - (len(rows) - 1) * (prefix - cap) > 0:
                prefix = cap
                rows.append(row)
                continue
            groups.append((prefix if len(rows) > 1 else 0, rows))
        prefix, rows = len(seq), [row]
    if rows:
        groups.append((prefix if len(rows) > 1 else 0, rows))
    return groups


def decoder_body(model):
    """The transformer body (embeddings, layers, final norm) of a causal LM or sequence classifier, peft-wrapped or not."""
    decoder_parts(model)  # the layout check, with its error
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model


@torch.no_grad()
def shared_prefix_states(body, sequences: list[list[int]], groups: list[tuple[int, list[int]]], pad_token_id: int,
                         batch_size: int):  # fmt: skip
    """Yield ``(row, hidden)`` for the rows of ``groups`` with a prefix: ``hidden`` (length, d) is ``body``'s output
    for every position of ``sequences[row]``, the group's prefix computed once.

    Groups go in batches of at most ``batch_size`` rows (a larger group repeats
    its prefix once per batch): the prefixes run first, right-padded, with a
    KV cache; the rows' own tokens then run on top of it, in groups of
    similar length (:func:`prefill_groups`), each row over its group's part
    of the cache at the positions it holds in the sequence.
    Causal attention makes each state the one a pass over the whole sequence
    computes, up to float rounding.
    """
    from transformers import DynamicCache

    device = next(body.parameters()).device
    pieces = [(p, rows[i : i + batch_size]) for p, rows in groups if p for i in range(0, len(rows), batch_size)]
    pieces.sort(key=lambda piece: piece[0])
    chunk: list[tuple[int, list[int]]] = []

    def run(chunk):
        lengths = [p for p, _ in chunk]
        width = max(lengths)
        ids, mask = pad_right([sequences[rows[0]][:p] for p, rows in chunk], pad_token_id)
        cache = DynamicCache(config=body.config)
        positions = torch.arange(width).expand(len(chunk), width)
        head = body(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                    cache=cache, use_cache=True).last_hidden_state  # fmt: skip
        owner = [g for g, (_, rows) in enumerate(chunk) for _ in rows]
        rows = [row for _, rows in chunk for row in rows]
        tails = [sequences[row][lengths[g] :] for g, row in zip(owner, rows)]
        # The rows' own tokens run in groups of similar length: one prefix can have answers of any length.
        for part in prefill_groups([len(tail) for tail in tails]):
            index = torch.tensor([owner[r] for r in part], device=device)
            repeated = DynamicCache(config=body.config)
            for layer, kv in enumerate(cache.layers):
                if not getattr(kv, "is_initialized", False):
                    break  # a view of the lower layers fills only theirs
                repeated.update(kv.keys[index], kv.values[index], layer)
            tail_ids, tail_mask = pad_right([tails[r] for r in part], pad_token_id)
            starts = torch.tensor([lengths[owner[r]] for r in part])
            tail_positions = starts[:, None] + torch.arange(tail_ids.shape[1])
            full_mask = torch.cat([mask[index.cpu()], tail_mask], dim=1)
            out = body(input_ids=tail_ids.to(device), attention_mask=full_mask.to(device),
                       position_ids=tail_positions.to(device), cache=repeated, use_cache=True).last_hidden_state  # fmt: skip
            for i, r in enumerate(part):
                g = owner[r]
                yield rows[r], torch.cat([head[g, : lengths[g]], out[i, : len(tails[r])]])

    for piece in pieces:
        if chunk and sum(len(rows) for _, rows in chunk) + len(piece[1]) > batch_size:
            yield from run(chunk)
            chunk = []
        chunk.append(piece)
    if chunk:
        yield from run(chunk)
