"""Benchmark: tokens/s of the project's sampler against Hugging Face ``generate`` and this machine's roofline.

For each dtype (the weights loaded in it, as the candidates and evaluate stages
load them) and batch size, the first B prompts of the shipped prompt set
(chat-formatted, left-padded) are sampled for ``--new-tokens`` tokens - no stop
token, so every row runs the full length - by

* **ours**: :func:`rlhf_core.generation.sample_tokens`, the one loop that the
  candidates, PPO and evaluation share (a KV cache, inverse-CDF sampling);
* **hf**: ``model.generate(do_sample=True, min_new_tokens=max_new_tokens=N, top_k=0)``,
  the same distribution (temperature 1, no truncation);
* **ours without the kernel** (batches up to ``rlhf_core.decoder.KERNEL_ROWS`` for
  the dtype, where the compiled kernel runs): the sampler with its one-token steps' linear
  layers as ``weight @ x.T`` (fp32) or ``F.linear`` (bf16) instead of
  :mod:`rlhf_core.kernels`' ``skinny_gemm``;
* **ours, plain linear** (fp32, batches up to ``rlhf_core.decoder.SKINNY_ROWS``):
  the sampler with its one-token steps' linear layers as ``F.linear``;
  both timed in turns with **ours** so that a drifting load hits all alike.

Each figure is the best of ``--repeats`` runs after a warm-up; tokens/s is
B x N / seconds, the prompt pass included.  The **roofline** at batch B bounds a
decode step from below: it reads every weight once (weight bytes / the copy
bandwidth measured in this run) and does 2 x weights x B FLOPs (/ the matmul
peak measured in this run, in that dtype); tokens/s cannot beat B / the larger
of the two.  The KV cache's reads and the prompt pass are left out, so the bound
is slightly optimistic.  Beside it, the rate at which this machine's matmul
streams weights of the model's layer shapes at that batch, as ``x @ W.T``
(``weight_stream_gb_s``), as ``W @ x.T`` (``weight_stream_wxt_gb_s``) and through the
kernel (``weight_stream_kernel_gb_s``): a decode step cannot read its weights faster
than its matmuls do, whatever the copy bandwidth.

    .venv/bin/python bench/sampling.py                                # batches 8-128, fp32 and bf16, the base model
    .venv/bin/python bench/sampling.py --batches 8 16 --dtypes float32 --repeats 1

Writes bench/results/sampling_<date>.json (machine, versions, roofline inputs,
every timing) and prints a markdown table.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))  # ppo_bench, also when a test imports this file

from ppo_bench.flops import matmul_peak_flops  # noqa: E402
from ppo_bench.host import memory_bandwidth, write_result  # noqa: E402
from ppo_bench.workload import limit_threads, model_and_prompts, one_line_errors  # noqa: E402

DTYPES = ("float32", "bfloat16")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="causal LM folder (default: params.yaml paths.base_model)")
    parser.add_argument("--params", default=str(REPO / "params.yaml"), help="params whose paths and prompts: section run")
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 16, 64, 128])
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens sampled per row (the ppo: default)")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per figure (the best counts)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the square matmul that measures the peak")
    parser.add_argument("--out", help="result JSON (default: bench/results/sampling_<date>.json)")
    return parser.parse_args(argv)


def weight_count(model) -> int:
    """Weights a decode step reads, each once (a tied embedding and LM head count once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def best_seconds(run, repeats: int) -> float:
    return best_seconds_interleaved([run], repeats)[0]


def best_seconds_interleaved(runs, repeats: int) -> list[float]:
    """The best of ``repeats`` timings of each run after a warm-up (first-call allocations and lazy
    initialisation), the runs taking turns (a drifting machine load hits all alike)."""
    for run in runs:
        run()
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for index, run in enumerate(runs):
            start = time.perf_counter()
            run()
            best[index] = min(best[index], time.perf_counter() - start)
    return best


def measure(model, tokenizer, prompts: list[str], batch: int, new_tokens: int, repeats: int) -> dict:
    import torch

    from rlhf_core import decoder, kernels
    from rlhf_core.generation import encode_queries, sample_tokens

    texts = (prompts * (batch // max(1, len(prompts)) + 1))[:batch]
    ids, mask = encode_queries(tokenizer, texts)

    def ours():
        rollout = sample_tokens(model, ids, mask, eos_token_id=-1, pad_token_id=tokenizer.pad_token_id,
                                max_new_tokens=new_tokens, generator=torch.Generator().manual_seed(0))  # fmt: skip
        assert rollout.response_ids.shape == (batch, new_tokens)

    @torch.no_grad()
    def hf():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        assert out.shape == (batch, ids.shape[1] + new_tokens)

    def without(limit: str):  # the sampler with no kernel (KERNEL_ROWS), or with F.linear throughout (SKINNY_ROWS)
        def run():
            kept = decoder.SKINNY_ROWS, decoder.KERNEL_ROWS
            decoder.KERNEL_ROWS = {}
            if limit == "SKINNY_ROWS":
                decoder.SKINNY_ROWS = 0
            try:
                ours()
            finally:
                decoder.SKINNY_ROWS, decoder.KERNEL_ROWS = kept

        return run

    tokens = batch * new_tokens
    row = {"batch": batch, "prompt_width": ids.shape[1], "padding_share": float(1 - mask.float().mean())}
    fp32, kernel = model.dtype == torch.float32, kernels.skinny_gemm() is not None
    # where they apply, the variants are timed in turns with ours (for bf16, plain linear is the sampler without kernel)
    variants = {"ours_without_kernel_tokens_per_s": kernel and batch <= decoder.KERNEL_ROWS.get(model.dtype, 0),
                "ours_plain_linear_tokens_per_s": fp32 and batch <= decoder.SKINNY_ROWS}  # fmt: skip
    runs = {"ours_without_kernel_tokens_per_s": without("KERNEL_ROWS"), "ours_plain_linear_tokens_per_s": without("SKINNY_ROWS")}
    names = [name for name, applies in variants.items() if applies]
    ours_s, *variant_s = best_seconds_interleaved([ours, *(runs[name] for name in names)], repeats)
    row.update({name: tokens / seconds for name, seconds in zip(names, variant_s)})
    hf_s = best_seconds(hf, repeats)
    streams = {"weight_stream_gb_s": "x @ W.T", "weight_stream_wxt_gb_s": "W @ x.T", "weight_stream_kernel_gb_s": "kernel"}
    if not kernel:
        del streams["weight_stream_kernel_gb_s"]
    return {**row, "ours_tokens_per_s": tokens / ours_s, "hf_tokens_per_s": tokens / hf_s,
            **{key: weight_stream(model, batch, repeats, how) / 1e9 for key, how in streams.items()}}


def weight_stream(model, batch: int, repeats: int, how: str = "x @ W.T") -> float:
    """Bytes/s at which ``F.linear`` (``how`` = ``x @ W.T``), ``weight @ x.T`` or the compiled kernel (``kernel``)
    reads the model's own layer weights at ``batch`` rows, one layer after another (far more weights than any cache
    holds): the rate a decode step's matmuls can stream its weights."""
    import torch
    import torch.nn.functional as F

    from rlhf_core import kernels
    from rlhf_core.decoder import decoder_parts

    linears = [m.weight for m in decoder_parts(model).layers.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=w.dtype) for w in linears}
    product = {"x @ W.T": F.linear, "W @ x.T": lambda x, w: torch.mm(w, x.t()),
               "kernel": lambda x, w: kernels.skinny_gemm()(x, w)}[how]  # fmt: skip
    seconds = best_seconds(lambda: [product(inputs[w.shape[1]], w) for w in linears], repeats)
    return sum(w.numel() * w.element_size() for w in linears) / seconds


def roofline(weights: int, element_bytes: int, batch: int, bandwidth: float, peak: float) -> dict:
    read_s, compute_s = weights * element_bytes / bandwidth, 2 * weights * batch / peak
    return {"roofline_tokens_per_s": batch / max(read_s, compute_s), "bound": "memory" if read_s >= compute_s else "compute"}


def markdown(result: dict) -> str:
    lines = ["| dtype | batch | ours tok/s | ours without kernel | ours, plain linear | HF generate tok/s | ours / HF "
             "| roofline tok/s (bound) | ours / roofline | weight stream GB/s: x @ W.T | W @ x.T | kernel |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in result["rows"]:
        without, plain = (f"{r[k]:.0f}" if k in r else "-" for k in ("ours_without_kernel_tokens_per_s", "ours_plain_linear_tokens_per_s"))
        streams = " | ".join(f"{r[k]:.1f}" if k in r else "-"
                             for k in ("weight_stream_gb_s", "weight_stream_wxt_gb_s", "weight_stream_kernel_gb_s"))  # fmt: skip
        lines.append(
            f"| {r['dtype']} | {r['batch']} | {r['ours_tokens_per_s']:.0f} | {without} | {plain} | {r['hf_tokens_per_s']:.0f} | "
            f"{r['ours_vs_hf']:.2f}x | {r['roofline_tokens_per_s']:.0f} ({r['bound']}) | {r['ours_share_of_roofline']:.0%} "
            f"| {streams} |"
        )
    return "\n".join(lines)


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from rlhf_core import kernels
    from rlhf_core.generation import load_policy

    limit_threads(args.threads)
    _, model_dir, prompts = model_and_prompts(REPO, args.params, args.model, max(args.batches))
    bandwidth = memory_bandwidth()
    peaks = {dtype: matmul_peak_flops(dtype, size=args.matmul_size) for dtype in args.dtypes}
    rows = []
    for dtype in args.dtypes:
        model, tokenizer = load_policy(model_dir, dtype)
        weights, element_bytes = weight_count(model), torch.finfo(model.dtype).bits // 8
        for batch in args.batches:
            row = {"dtype": dtype, **measure(model, tokenizer, prompts, batch, args.new_tokens, args.repeats),
                   **roofline(weights, element_bytes, batch, bandwidth, peaks[dtype])}  # fmt: skip
            row["ours_vs_hf"] = row["ours_tokens_per_s"] / row["hf_tokens_per_s"]
            row["ours_share_of_roofline"] = row["ours_tokens_per_s"] / row["roofline_tokens_per_s"]
            rows.append(row)
            print(f"{dtype} batch {batch}: ours {row['ours_tokens_per_s']:.0f} tok/s, hf {row['hf_tokens_per_s']:.0f}",
                  file=sys.stderr)  # fmt: skip
        del model
    result = write_result("sampling", args, {
        "model": str(model_dir), "weights": weights, "new_tokens": args.new_tokens,
        "decode_linears": kernels.status(), "memory_bandwidth_gb_s": bandwidth / 1e9,
        "matmul_peak_gflop_s": {d: p / 1e9 for d, p in peaks.items()},
        "rows": rows,
    })  # fmt: skip
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
