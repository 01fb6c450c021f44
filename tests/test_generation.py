import pytest
import torch

from rlhf_core.base_model import load_causal_lm, load_tokenizer
from rlhf_core.generation import encode_queries, load_policy, sample_completions, sample_tokens

PROMPTS = ["Hi", "Explain how tides work in two sentences, please.", "List three fruits."]


def _greedy_reference(model, tokenizer, steps):
    ids, mask = encode_queries(tokenizer, PROMPTS)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    return ids, mask, out[:, ids.shape[1]:]


#: both numeric paths on any host (bf16 weights load and run on every x86 CPU)
DTYPES = pytest.mark.parametrize("dtype", ["float32", "bfloat16"])


@DTYPES
def test_near_zero_temperature_matches_greedy_decoding_with_left_padding(tiny_base_model, dtype):
    model, tokenizer = load_policy(tiny_base_model, dtype)
    assert model.dtype == getattr(torch, dtype)
    ids, mask, greedy = _greedy_reference(model, tokenizer, 6)
    rollout = sample_tokens(model, ids, mask, eos_token_id=-1, pad_token_id=tokenizer.pad_token_id,
                            max_new_tokens=6, temperature=1e-4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rollout.response_ids, greedy)
    assert rollout.response_mask.all() and not rollout.finished.any()


def test_stop_token_ends_a_row_and_masks_the_rest(tiny_base_model):
    model, tokenizer = load_causal_lm(tiny_base_model).eval(), load_tokenizer(tiny_base_model)
    ids, mask, greedy = _greedy_reference(model, tokenizer, 6)
    stop = int(greedy[0, 2])
    rollout = sample_tokens(model, ids, mask, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id,
                            max_new_tokens=6, temperature=1e-4, generator=torch.Generator().manual_seed(0))
    assert bool(rollout.finished[0])
    first_stop = int((greedy[0] == stop).nonzero()[0])
    assert rollout.response_mask[0].tolist() == [1] * (first_stop + 1) + [0] * (rollout.response_ids.shape[1] - first_stop - 1)
    assert (rollout.response_ids[0, first_stop + 1:] == tokenizer.pad_token_id).all()


@DTYPES
def test_sample_completions_is_deterministic_per_seed(tiny_base_model, dtype):
    model, tokenizer = load_policy(tiny_base_model, dtype)
    kwargs = dict(num_samples=2, max_new_tokens=5, batch_size=4)
    first, stats = sample_completions(model, tokenizer, PROMPTS, seed=3, **kwargs)
    again, _ = sample_completions(model, tokenizer, PROMPTS, seed=3, **kwargs)
    other, _ = sample_completions(model, tokenizer, PROMPTS, seed=4, **kwargs)
    assert [s.token_ids for s in first] == [s.token_ids for s in again]
    assert [s.token_ids for s in first] != [s.token_ids for s in other]
    assert [(s.prompt_index, s.sample_index) for s in first] == [(p, k) for p in range(3) for k in range(2)]
    assert stats.tokens == sum(s.num_tokens for s in first) and stats.tokens_per_second > 0


def test_samples_of_one_prompt_share_its_pass_and_match_greedy(tiny_base_model):
    model, tokenizer = load_causal_lm(tiny_base_model).eval(), load_tokenizer(tiny_base_model)
    ids, mask, greedy = _greedy_reference(model, tokenizer, 5)
    rollout = sample_tokens(model, ids, mask, eos_token_id=-1, pad_token_id=tokenizer.pad_token_id, max_new_tokens=5,
                            temperature=1e-4, generator=torch.Generator().manual_seed(0), num_samples=3)
    assert torch.equal(rollout.response_ids, greedy.repeat_interleave(3, dim=0))
    assert torch.equal(rollout.query_ids, ids.repeat_interleave(3, dim=0))


def test_a_model_without_the_llama_layout_samples_through_its_own_forward():
    """The sampling loop needs only a causal LM's forward and cache (here one with per-head q/k norms)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip
    model = Qwen3ForCausalLM(config).eval()
    ids, mask = torch.tensor([[0, 5, 6], [7, 8, 9]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    rollout = sample_tokens(model, ids, mask, eos_token_id=-1, pad_token_id=0, max_new_tokens=4,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert rollout.response_ids.shape == (2, 4) and rollout.response_mask.all()


# --------------------------------------------------------------------------- the sampling step


def test_inverse_cdf_draws_in_proportion_and_never_a_token_of_weight_zero():
    from rlhf_core.generation import CDF_BLOCK, sample_next_token

    vocab = 3 * CDF_BLOCK + 17  # blocks of every kind, the last one partial
    logits = torch.full((vocab,), -float("inf"))
    chosen = torch.tensor([3, CDF_BLOCK - 1, CDF_BLOCK, 2 * CDF_BLOCK + 5, vocab - 1])
    logits[chosen] = torch.tensor([0.0, 1.0, 2.0, 0.5, 1.5])
    draws = 20000
    token, logprob = sample_next_token(logits.expand(draws, vocab), 1.0, torch.Generator().manual_seed(0))
    assert set(token.tolist()) <= set(chosen.tolist())
    expected = torch.softmax(logits[chosen], -1)
    observed = torch.tensor([(token == c).float().mean() for c in chosen])
    assert (observed - expected).abs().max() < 4 * (expected * (1 - expected) / draws).sqrt().max()
    assert torch.allclose(logprob, torch.log_softmax(logits, -1)[token], atol=1e-6)


def test_temperature_and_nucleus_truncation():
    from rlhf_core.generation import sample_next_token

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).expand(4000, 4)
    token, logprob = sample_next_token(logits, 2.0, torch.Generator().manual_seed(0), top_p=0.8)
    # tempered: [0.379, 0.294, 0.208, 0.120]; the smallest prefix whose mass reaches 0.8 keeps the first three
    assert set(token.tolist()) == {0, 1, 2}
    assert torch.allclose(logprob, torch.log_softmax(logits / 2.0, -1).gather(-1, token[:, None]).squeeze(-1), atol=1e-6)


def test_prefill_groups_bound_padding_and_keep_every_row_once():
    from rlhf_core.decoder import prefill_groups

    lengths = [40, 12, 80, 11, 13, 12, 85, 10, 41, 14, 12, 39, 11, 13, 38, 12, 84, 10]
    groups = prefill_groups(lengths, padding=0.25, min_rows=4)
    assert sorted(row for group in groups for row in group) == list(range(len(lengths)))
    assert len(groups) > 1
    for group in groups:
        widest, real = max(lengths[r] for r in group), sum(lengths[r] for r in group)
        assert len(group) * widest <= 1.25 * real or len(group) <= 4
    assert prefill_groups([30] * 5) == [[0, 1, 2, 3, 4]]  # equal lengths: one pass
    assert prefill_groups([]) == []


@DTYPES
def test_grouped_prefill_samples_what_one_padded_pass_samples(tiny_base_model, dtype):
    """Prompts of very different lengths are prefilled in groups; the samples and log-probs must not change."""
    from rlhf_core.decoder import DecodeStep

    class OnePass(DecodeStep):
        def prefill(self, input_ids, attention_mask, position_ids, cache):
            return self(input_ids, attention_mask, position_ids, cache)

    model, tokenizer = load_policy(tiny_base_model, dtype)
    prompts = [("word " * n).strip() + "?" for n in [1, 2, 3, 2, 1, 2, 3, 1, 2, 40, 41, 42, 40, 43, 41, 40, 42, 44]]
    ids, mask = encode_queries(tokenizer, prompts)
    runs = [
        sample_tokens(step, ids, mask, eos_token_id=-1, pad_token_id=tokenizer.pad_token_id, max_new_tokens=5,
                      temperature=1.0, generator=torch.Generator().manual_seed(7))  # fmt: skip
        for step in (DecodeStep(model), OnePass(model))
    ]
    assert torch.equal(runs[0].response_ids, runs[1].response_ids)
    tolerance = 1e-4 if dtype == "float32" else 5e-2
    assert torch.allclose(runs[0].sample_logprobs, runs[1].sample_logprobs, atol=tolerance)


def test_shared_prefix_groups_share_only_real_prefixes_and_keep_every_row_once():
    from rlhf_core.decoder import MIN_SHARED_PREFIX, shared_prefix_groups

    prompt, other = list(range(100, 140)), list(range(200, 230))
    sequences = [
        prompt + [1, 2, 3], other + [5], prompt + [1, 2, 4, 4], prompt + [9], other + [6, 7],
        list(range(100, 110)) + [50, 51, 52],  # shares 10 tokens with the prompt: fewer than MIN_SHARED_PREFIX
        prompt,  # the prompt alone: a row always keeps at least its last token
        [7, 7, 7], [7, 7, 7],  # identical but short
    ]
    groups = shared_prefix_groups(sequences)
    assert sorted(row for _, rows in groups for row in rows) == list(range(len(sequences)))
    by_row = {row: (prefix, rows) for prefix, rows in groups for row in rows}
    assert by_row[0][1] == by_row[2][1] == by_row[3][1] == by_row[6][1] and by_row[0][0] == len(prompt) - 1
    assert sorted(by_row[1][1]) == [1, 4] and by_row[1][0] == len(other)
    for row in (5, 7, 8):
        assert by_row[row] == (0, [row])
    for prefix, rows in groups:
        assert len(rows) == 1 or prefix >= MIN_SHARED_PREFIX
        for row in rows:
            assert prefix < len(sequences[row]) and sequences[row][:prefix] == sequences[rows[0]][:prefix]
    # A row that would shrink a large group's prefix by more than it saves starts a group of its own.
    crowd = [prompt + [i] for i in range(6)] + [prompt[:20] + [999]]
    assert sorted(len(rows) for _, rows in shared_prefix_groups(crowd)) == [1, 6]
    assert shared_prefix_groups([]) == []


def test_skinny_linears_agree_with_linear_and_touch_only_skinny_fp32_calls_without_gradients():
    from rlhf_core.decoder import SKINNY_ROWS, skinny_linears

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Linear(40, 8, bias=False))
    half = torch.nn.Linear(24, 40).to(torch.bfloat16)
    skinny, wide = torch.randn(2, 3, 24), torch.randn(SKINNY_ROWS + 1, 24)
    with torch.no_grad():
        expected = model(skinny)
    with skinny_linears(model), skinny_linears(half):
        assert all("forward" in m.__dict__ for m in model) and "forward" not in half.__dict__
        with torch.no_grad():
            got = model(skinny)
            assert torch.equal(model(wide), torch.nn.functional.linear(model[0](wide), model[1].weight))
        trained = model(skinny)  # with gradients: the usual path, and they flow
        trained.sum().backward()
    assert got.shape == expected.shape == (2, 3, 8)
    assert torch.allclose(got, expected, atol=1e-5)
    assert model[0].weight.grad is not None
    assert not any("forward" in m.__dict__ for m in model)  # restored after the block


def test_skinny_linears_restore_the_layers_when_the_block_raises(tiny_base_model):
    from rlhf_core.decoder import skinny_linears

    model, _ = load_policy(tiny_base_model, "float32")
    with pytest.raises(RuntimeError), skinny_linears(model):
        assert any("forward" in m.__dict__ for m in model.modules())
        raise RuntimeError("stop")
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_the_sampler_draws_the_same_tokens_with_and_without_skinny_linears(tiny_base_model, monkeypatch):
    import rlhf_core.decoder as decoder

    model, tokenizer = load_policy(tiny_base_model, "float32")
    ids, mask = encode_queries(tokenizer, PROMPTS)
    runs = []
    for rows in (decoder.SKINNY_ROWS, 0):
        monkeypatch.setattr(decoder, "SKINNY_ROWS", rows)
        runs.append(sample_tokens(model, ids, mask, eos_token_id=-1, pad_token_id=tokenizer.pad_token_id,
                                  max_new_tokens=8, generator=torch.Generator().manual_seed(3)))  # fmt: skip
    assert torch.equal(runs[0].response_ids, runs[1].response_ids)
    assert torch.allclose(runs[0].sample_logprobs, runs[1].sample_logprobs, atol=1e-4)


# --------------------------------------------------------------------------- rows that ended leave the batch

#: a logit bonus for the stop token that ends a tiny random model's rows after a few tokens each, at different steps
STOP_BONUS = 9.0


@DTYPES
def test_the_sampler_stops_running_rows_that_ended_and_samples_the_same(tiny_base_model, dtype, monkeypatch):
    """Rows that ended leave the step's batch; tokens, log-probs and the recorded trunk states stay those of a run
    that keeps every row (each row draws the same random numbers either way)."""
    import rlhf_core.generation as generation
    from rlhf_core.decoder import RecordingStep

    model, tokenizer = load_policy(tiny_base_model, dtype)
    stop = tokenizer.eos_token_id

    class Stopping(RecordingStep):
        def __init__(self):
            super().__init__(model, 1)
            self.widths = []

        def __call__(self, input_ids, attention_mask, position_ids, cache):
            self.widths.append(input_ids.shape[0])
            logits = super().__call__(input_ids, attention_mask, position_ids, cache)
            logits[:, stop] += STOP_BONUS
            return logits

    prompts = [("word " * n).strip() + "?" for n in range(1, 13)]
    ids, mask = encode_queries(tokenizer, prompts)
    runs, default = {}, generation.DROP_ENDED
    for share in (default, 2.0):  # 2.0: rows are never dropped
        monkeypatch.setattr(generation, "DROP_ENDED", share)
        step = Stopping()
        rollout = sample_tokens(step, ids, mask, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id,
                                max_new_tokens=16, generator=torch.Generator().manual_seed(2), num_samples=2,
                                feed_last=True)  # fmt: skip
        runs[share] = rollout, step.widths, rollout.with_states(step.states())
    (dropping, widths, states), (keeping, all_widths, all_states) = runs[default], runs[2.0]
    lengths = keeping.response_mask.sum(-1)
    assert keeping.finished.sum() >= 12 and len(set(lengths.tolist())) >= 4  # rows ended at many different steps
    assert set(all_widths[1:]) == {24} and min(widths[1:]) < 24 and widths[1:] == sorted(widths[1:], reverse=True)
    assert {width % generation.ROW_MULTIPLE for width in widths[1:]} == {0}
    assert torch.equal(dropping.response_ids, keeping.response_ids) and torch.equal(dropping.finished, keeping.finished)
    assert torch.equal(dropping.response_mask, keeping.response_mask)
    tolerance = 1e-4 if dtype == "float32" else 5e-2
    assert torch.allclose(dropping.sample_logprobs, keeping.sample_logprobs, atol=tolerance)
    for (ids_a, a), (ids_b, b) in zip(states, all_states):
        assert ids_a == ids_b and a.shape == b.shape and torch.allclose(a, b, atol=tolerance)


# --------------------------------------------------------------------------- the KV cache written in place


@DTYPES
def test_a_cache_with_room_samples_the_same_bits_as_one_that_grows(tiny_base_model, dtype, monkeypatch):
    """After the prompt pass each layer's cache gets room for the answer (``decoder.reserve``) and the steps write
    their positions in place; with rows dropping out, several samples per prompt and the recorded trunk states, the
    run is the same to the last bit as one whose cache grows by concatenation."""
    from transformers.cache_utils import DynamicLayer

    import rlhf_core.generation as generation
    from rlhf_core.decoder import RecordingStep, _reserved_layer_class

    model, tokenizer = load_policy(tiny_base_model, dtype)
    prompts = [("word " * n).strip() + "?" for n in range(1, 11)]
    ids, mask = encode_queries(tokenizer, prompts)

    class Step(RecordingStep):  # keeps its cache; its stop token likelier, so that rows end at different steps
        def new_cache(self):
            self.cache = super().new_cache()
            return self.cache

        def __call__(self, input_ids, attention_mask, position_ids, cache):
            logits = super().__call__(input_ids, attention_mask, position_ids, cache)
            logits[:, tokenizer.eos_token_id] += STOP_BONUS
            return logits

    runs = []
    for reserve in (generation.reserve, lambda cache, positions: None):
        monkeypatch.setattr(generation, "reserve", reserve)
        step = Step(model, 1)
        rollout = sample_tokens(step, ids, mask, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                max_new_tokens=12, generator=torch.Generator().manual_seed(5), num_samples=3,
                                feed_last=True)  # fmt: skip
        runs.append((rollout, step.states(), {type(layer) for layer in step.cache.layers}))
    (reserved, states, kinds), (grown, grown_states, grown_kinds) = runs
    assert kinds == {_reserved_layer_class()} and grown_kinds == {DynamicLayer}
    assert int(reserved.response_mask.sum(-1).min()) < 12  # some rows ended early and left the batch
    for field in ("response_ids", "response_mask", "finished", "sample_logprobs"):
        assert torch.equal(getattr(reserved, field), getattr(grown, field)), field
    assert torch.equal(states, grown_states)


def test_a_reserved_cache_layer_out_of_room_grows_like_a_dynamic_one():
    """Through its room, a batch selection, past its room and after a crop, a layer returns the same keys and values
    as a plain ``DynamicLayer``."""
    from transformers import DynamicCache

    from rlhf_core.decoder import reserve

    generator = torch.Generator().manual_seed(0)
    plain, reserved = DynamicCache(), DynamicCache()
    prompt = [torch.randn(4, 2, 5, 8, generator=generator) for _ in range(2)]
    for cache in (plain, reserved):
        cache.update(*prompt, 0)
    reserve(reserved, 2)
    rows = torch.arange(4)
    for index in range(4):
        if index == 2:  # the room is full: drop a row, then run past the room
            rows = torch.tensor([0, 2, 3])
            for cache in (plain, reserved):
                cache.batch_select_indices(torch.tensor([0, 2, 3]))
        keys, values = (torch.randn(len(rows), 2, 1, 8, generator=generator) for _ in range(2))
        want = plain.update(keys, values, 0)
        got = reserved.update(keys, values, 0)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), index
    assert reserved.get_seq_length() == plain.get_seq_length() == 9 and reserved.layers[0].buffers is None
    for cache in (plain, reserved):
        cache.crop(-3)
    assert torch.equal(reserved.layers[0].keys, plain.layers[0].keys) and reserved.get_seq_length() == 6
