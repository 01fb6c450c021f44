"""The compiled decode-step kernel (``rlhf_core.kernels``): equal to torch's matmul, the same bits on every path,
built once and atomically, and a clear fallback wherever it cannot run."""

import ctypes
import shutil

import pytest
import torch

from rlhf_core import kernels

needs_kernel = pytest.mark.skipif(kernels.skinny_gemm() is None, reason=f"kernel not available: {kernels.status()}")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """The kernel loaded again under this test's environment (its own cache folder), and again after it."""
    monkeypatch.setenv("RLHF_KERNEL_DIR", str(tmp_path / "kernels"))
    kernels._load.cache_clear()
    yield tmp_path / "kernels"
    kernels._load.cache_clear()


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17, 64])
@pytest.mark.parametrize("out_features,width", [(1, 16), (2, 48), (5, 32), (50, 576), (192, 64)])
def test_the_kernel_computes_x_times_w_transposed(rows, out_features, width):
    generator = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(rows, width, generator=generator)
    weight = torch.randn(out_features, width, generator=generator)
    bias = torch.randn(out_features, generator=generator)
    gemm = kernels.skinny_gemm()
    assert torch.allclose(gemm(x, weight), x @ weight.T, rtol=1e-5, atol=1e-4)
    assert torch.allclose(gemm(x, weight, bias), torch.addmm(bias, x, weight.T), rtol=1e-5, atol=1e-4)
    # leading dimensions kept, as nn.Linear keeps them
    assert gemm(x.reshape(1, rows, width), weight).shape == (1, rows, out_features)
    # bf16 weights (and activations): computed in fp32 from the exact widened values, returned in bf16
    half, half_x, half_bias = weight.to(torch.bfloat16), x.to(torch.bfloat16), bias.to(torch.bfloat16)
    got = gemm(half_x, half, half_bias)
    want = torch.addmm(half_bias.float(), half_x.float(), half.float().T)
    assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), want, rtol=1e-2, atol=1e-2)


@needs_kernel
def test_the_same_bits_whatever_the_number_of_threads():
    x, weight = torch.randn(13, 576), torch.randn(1537, 576)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.skinny_gemm()(x, weight)
        torch.set_num_threads(2)
        two = kernels.skinny_gemm()(x, weight)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def _avx2_path() -> kernels.SkinnyGemm:
    path = kernels.skinny_gemm().path
    return kernels.SkinnyGemm(ctypes.CDLL(str(path)), path, avx2=True)


@needs_kernel
@pytest.mark.parametrize("rows", [3, 8, 19])  # the AVX2 path's narrow blocks (up to 8 rows) and its wide ones
def test_the_avx512_and_avx2_paths_give_the_same_bits(rows):
    """Both x86 paths run one summation order: a machine with AVX-512 and one with only AVX2 sample alike."""
    if kernels.skinny_gemm().isa != "avx512":
        pytest.skip("this CPU runs only the AVX2 path; the comparison needs AVX-512")
    avx2 = _avx2_path()
    x, weight, bias = torch.randn(rows, 576), torch.randn(1000, 576), torch.randn(1000)
    assert torch.equal(avx2(x, weight, bias), kernels.skinny_gemm()(x, weight, bias))
    assert torch.allclose(avx2(x, weight, bias), torch.addmm(bias, x, weight.T), rtol=1e-5, atol=1e-4)
    half = weight.to(torch.bfloat16)
    assert torch.equal(avx2(x, half, bias), kernels.skinny_gemm()(x, half, bias))


@needs_kernel
@pytest.mark.parametrize("path", ["this CPU's", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_gets_the_same_bits_in_a_batch_of_any_size(path, dtype):
    """Each path picks its blocks by the number of rows (AVX2: 1 x 8 up to 8 rows, 4 x 1 above); every block runs one
    arithmetic per output, so a row's result does not depend on the batch it is computed in - what lets the sampler
    drop ended rows without changing the others' samples.  1001 weight rows leave a tail for every block height."""
    gemm = _avx2_path() if path == "avx2" else kernels.skinny_gemm()
    generator = torch.Generator().manual_seed(7)
    x, bias = torch.randn(19, 576, generator=generator), torch.randn(1001, generator=generator)
    weight = torch.randn(1001, 576, generator=generator).to(dtype)
    whole = gemm(x, weight, bias)
    for rows in (1, 3, 8, 9, 16):
        assert torch.equal(gemm(x[:rows], weight, bias), whole[:rows]), rows
        assert torch.equal(gemm(x[-rows:], weight, bias), whole[-rows:]), rows


@needs_kernel
def test_one_build_per_source_compiler_and_flags_written_whole(fresh):
    path = kernels.build()
    assert path.parent == fresh and path.exists()
    stamp = path.stat().st_mtime_ns
    assert kernels.build() == path and path.stat().st_mtime_ns == stamp  # cached, not compiled again
    assert [p.name for p in fresh.iterdir()] == [path.name]  # no half-written file left behind


def test_turned_off_it_says_so_and_the_sampler_keeps_torch(fresh, monkeypatch):
    monkeypatch.setenv("RLHF_KERNELS", "off")
    assert kernels.skinny_gemm() is None and kernels.status() == "off: RLHF_KERNELS=off"
    assert kernels.decode_path(torch.float32, "cpu") == "off: RLHF_KERNELS=off"
    assert kernels.decode_path(torch.bfloat16, "cpu") == "off: RLHF_KERNELS=off"
    assert kernels.decode_path(torch.float32, "cuda") == kernels.decode_path(torch.float16, "cpu") == "torch"
    from rlhf_core.decoder import skinny_linears

    layer = torch.nn.Linear(32, 48)
    x = torch.randn(4, 32)
    with skinny_linears(layer), torch.no_grad():
        assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5)


@pytest.mark.parametrize("compiler,reason", [
    ("/nowhere/cc", "no C compiler"), ("false", "false failed"), ('"cc -O2', "No closing quotation"),
    ("cc --no-such-option", "cc failed" if shutil.which("cc") else "no C compiler"),
])
def test_without_a_working_compiler_it_says_why_and_leaves_nothing(fresh, monkeypatch, compiler, reason):
    monkeypatch.setenv("CC", compiler)
    assert kernels.skinny_gemm() is None
    assert kernels.status().startswith("off: ") and reason in kernels.status()
    assert not fresh.exists() or not any(fresh.iterdir())


@needs_kernel
def test_a_damaged_cached_build_is_built_again(fresh):
    path = kernels.build()
    path.write_bytes(b"not a shared library")
    kernels._load.cache_clear()
    assert kernels.skinny_gemm() is not None and kernels.status() in ("avx512", "avx2")
    assert ctypes.CDLL(str(path)).skinny_gemm_isa() in (512, 256)


def test_an_unwritable_cache_folder_is_a_reason_not_a_traceback(fresh, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("RLHF_KERNEL_DIR", str(blocker / "kernels"))  # a folder inside a file
    assert kernels.skinny_gemm() is None and "cannot write to" in kernels.status()


@needs_kernel
def test_the_sampler_runs_its_one_token_steps_through_the_kernel(tiny_base_model, monkeypatch):
    """The tiny model's layers (widths 64 and 128) go through the kernel in the one-token steps only, and the
    sampler draws the tokens that F.linear draws."""
    import rlhf_core.decoder as decoder
    from rlhf_core.generation import encode_queries, load_policy, sample_tokens

    model, tokenizer = load_policy(tiny_base_model, "float32")
    ids, mask = encode_queries(tokenizer, ["Hello there", "What is the capital of France?", "Hi"])
    kernels.skinny_gemm()  # loaded (and checked) before the count begins
    call, rows = kernels.SkinnyGemm.run, []
    monkeypatch.setattr(kernels.SkinnyGemm, "run", lambda self, x, w, b=None: rows.append(x.shape[0]) or call(self, x, w, b))
    runs = []
    for limit in (decoder.KERNEL_ROWS, {}):
        monkeypatch.setattr(decoder, "KERNEL_ROWS", limit)
        runs.append(sample_tokens(model, ids, mask, eos_token_id=-1, pad_token_id=tokenizer.pad_token_id,
                                  max_new_tokens=6, generator=torch.Generator().manual_seed(5)))  # fmt: skip
    assert rows and set(rows) == {3}  # 3 rows per one-token step; the prompt pass keeps F.linear
    assert len(rows) == 5 * (2 * 7 + 1)  # 5 steps after the prompt pass x (2 layers x 7 linears + the LM head)
    assert torch.equal(runs[0].response_ids, runs[1].response_ids)
    assert torch.allclose(runs[0].sample_logprobs, runs[1].sample_logprobs, atol=1e-5)



@needs_kernel
def test_bf16_one_token_steps_run_through_the_kernel_too(tiny_base_model, monkeypatch):
    """bf16 weights: the kernel (half the bytes of fp32) where it runs, F.linear (oneDNN) without it - never the
    fp32-only ``weight @ x.T`` swap; both sample the same distribution to bf16 rounding."""
    import rlhf_core.decoder as decoder
    from rlhf_core.generation import encode_queries, load_policy, sample_tokens

    model, tokenizer = load_policy(tiny_base_model, "bfloat16")
    ids, mask = encode_queries(tokenizer, ["Hello there", "What is the capital of France?"])
    kernels.skinny_gemm()
    call, dtypes = kernels.SkinnyGemm.run, []
    monkeypatch.setattr(kernels.SkinnyGemm, "run", lambda self, x, w, b=None: dtypes.append(w.dtype) or call(self, x, w, b))
    runs = []
    for limit in (decoder.KERNEL_ROWS, {}):
        monkeypatch.setattr(decoder, "KERNEL_ROWS", limit)
        runs.append(sample_tokens(model, ids, mask, eos_token_id=-1, pad_token_id=tokenizer.pad_token_id,
                                  max_new_tokens=4, generator=torch.Generator().manual_seed(5)))  # fmt: skip
    assert dtypes and set(dtypes) == {torch.bfloat16} and len(dtypes) == 3 * (2 * 7 + 1)  # only with the kernel
    first = runs[0].response_ids[:, 0]  # drawn from the prompt pass's logits, which no step computed
    assert torch.equal(first, runs[1].response_ids[:, 0])
    assert torch.allclose(runs[0].sample_logprobs[:, 0], runs[1].sample_logprobs[:, 0])


@needs_kernel
def test_ppo_bf16_rollouts_sample_their_bf16_copy_through_the_kernel(tiny_base_model, monkeypatch):
    from rlhf_core.config import PPOConfig
    from rlhf_core.ppo.policy import build_actor_critic

    from .test_ppo_passes import _rollout

    torch.manual_seed(0)
    model = build_actor_critic(tiny_base_model, PPOConfig(freeze_layers=1, dtype="bfloat16"), torch.device("cpu"))
    kernels.skinny_gemm()
    call, seen = kernels.SkinnyGemm.run, []
    monkeypatch.setattr(kernels.SkinnyGemm, "run", lambda self, x, w, b=None: seen.append(w) or call(self, x, w, b))
    rollout = _rollout(model, tiny_base_model, max_new_tokens=3)
    copy = model.sampling_copy().parts
    assert any(w is copy.lm_head.weight for w in seen) and all(w.dtype == torch.bfloat16 for w in seen)
    assert rollout.response_ids.shape[1] == 3
