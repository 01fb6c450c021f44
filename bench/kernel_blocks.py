"""Benchmark: the decode kernel's linear layers against an earlier version of its source, and against torch.

``rlhf_core/kernels/skinny_gemm.c`` as it is now and as it was at ``--baseline`` (a git revision) are both built
with the flags the project uses, then each runs the one-token linear layers of the base model - every decoder
layer's q, k, v, o, gate, up and down projections and the output head, at their real shapes, each layer its own
weights so that they stream from memory as in a decode step - at each batch size, in turns with torch's
``weight @ x.T`` (what the sampler uses above ``rlhf_core.decoder.KERNEL_ROWS`` rows) and ``F.linear``.  Both
builds must give the same bits (checked on every shape and batch before timing: a change of blocking must not
change a sample).  ``--path avx2`` runs the AVX2 entry point on a CPU with AVX-512 too.

    .venv/bin/python bench/kernel_blocks.py                         # this CPU's path, batches 1-64
    .venv/bin/python bench/kernel_blocks.py --path avx2 --baseline 61b8757 --rounds 7

Writes bench/results/kernel_blocks_<date>.json (machine, both sources' hashes, every round's time) and prints a
markdown table: milliseconds per decode step's linear layers (median of the rounds) and the weight bytes read per
second.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from ppo_bench.host import write_result  # noqa: E402
from ppo_bench.workload import limit_threads, one_line_errors  # noqa: E402

SOURCE = "rlhf_core/kernels/skinny_gemm.c"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="61b8757", help="git revision of the source to compare with "
                        "(default: the last one with 2 x 2 AVX2 blocks for every batch)")  # fmt: skip
    parser.add_argument("--model", help="model folder whose config.json gives the shapes (default: params.yaml paths.base_model)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 8, 16, 32, 48, 64])
    parser.add_argument("--path", choices=("native", "avx2"), default="native", help="this CPU's path, or the AVX2 one")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per figure, in turns (the median counts)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="result JSON (default: bench/results/kernel_blocks_<date>.json)")
    return parser.parse_args(argv)


def layer_shapes(model_dir: Path) -> list[tuple[int, int]]:
    """(out_features, in_features) of every linear layer a decode step runs, in order, output head last."""
    from rlhf_core.errors import DataError

    try:
        config = json.loads((model_dir / "config.json").read_text())
        hidden, inner, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
        heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
        kv = hidden // heads * kv_heads
        vocab = config["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{model_dir}/config.json: no Llama-style shapes ({exc}); run `rlhf base-model` first") from exc
    one = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inner, hidden), (inner, hidden), (hidden, inner)]
    return one * layers + [(vocab, hidden)]


def build(source: bytes, directory: Path, name: str):
    """The source compiled as the project compiles its kernel (:func:`rlhf_core.kernels.build`), loaded."""
    from rlhf_core import kernels
    from rlhf_core.errors import RLHFError

    path = directory / f"{name}.c"
    path.write_bytes(source)
    try:
        return ctypes.CDLL(str(kernels.build(directory, source=path)))
    except (RuntimeError, OSError) as exc:
        raise RLHFError(f"{name}: {exc}") from exc


def entry(library, path: str):
    gemm = library.skinny_gemm_avx2 if path == "avx2" else library.skinny_gemm
    gemm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    gemm.restype = None
    return gemm


@one_line_errors
def main(argv=None) -> int:
    import torch

    from rlhf_core.config import load_params
    from rlhf_core.errors import RLHFError

    args = parse_args(argv)
    limit_threads(args.threads)
    model_dir = Path(args.model or REPO / load_params(REPO / "params.yaml").paths.base_model)
    shapes = layer_shapes(model_dir)
    done = subprocess.run(["git", "-C", str(REPO), "show", f"{args.baseline}:{SOURCE}"], capture_output=True)
    if done.returncode != 0:
        raise RLHFError(f"--baseline {args.baseline}: no {SOURCE} there ({done.stderr.decode().strip()})")
    sources = {"baseline": done.stdout, "current": (REPO / SOURCE).read_bytes()}
    with tempfile.TemporaryDirectory() as folder:
        gemms = {name: entry(build(source, Path(folder), name), args.path) for name, source in sources.items()}
        generator = torch.Generator().manual_seed(0)
        weights = [torch.randn(shape, generator=generator) for shape in shapes]
        rows = []
        for batch in args.batches:
            inputs = {width: torch.randn(batch, width, generator=generator) for width in {w for _, w in shapes}}
            outputs = {n: torch.empty(batch, n) for n in {n for n, _ in shapes}}

            def kernel(gemm):
                def run():
                    for w in weights:
                        x, y = inputs[w.shape[1]], outputs[w.shape[0]]
                        gemm(w.data_ptr(), x.data_ptr(), y.data_ptr(), None, batch, w.shape[0], w.shape[1], args.threads)

                return run

            for w in {w.shape: w for w in weights}.values():  # the same bits from both builds, on every shape
                got = []
                for gemm in gemms.values():
                    y = torch.empty(batch, w.shape[0])
                    gemm(w.data_ptr(), inputs[w.shape[1]].data_ptr(), y.data_ptr(), None, batch, *w.shape, args.threads)
                    got.append(y)
                if not torch.equal(*got):
                    raise RLHFError(f"batch {batch}, weight {tuple(w.shape)}: the two builds disagree")
            ways = {"baseline": kernel(gemms["baseline"]), "current": kernel(gemms["current"]),
                    "W @ x.T": lambda: [torch.mm(w, inputs[w.shape[1]].t()) for w in weights],
                    "F.linear": lambda: [torch.nn.functional.linear(inputs[w.shape[1]], w) for w in weights]}  # fmt: skip
            times = {name: [] for name in ways}
            for way in ways.values():  # warm-up
                way()
            for _ in range(args.rounds):
                for name, way in ways.items():
                    start = time.perf_counter()
                    way()
                    times[name].append(time.perf_counter() - start)
            median = {name: statistics.median(t) for name, t in times.items()}
            row = {"batch": batch, "seconds": times, "median_ms": {k: v * 1e3 for k, v in median.items()},
                   "current_vs_baseline": median["baseline"] / median["current"],
                   "current_vs_wxt": median["W @ x.T"] / median["current"]}  # fmt: skip
            rows.append(row)
            print(f"batch {batch}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in row["median_ms"].items()), flush=True)
    weight_bytes = sum(w.numel() * 4 for w in weights)
    result = write_result("kernel_blocks", args, {
        "path": args.path, "weight_bytes": weight_bytes, "layers": len(shapes),
        "sources": {k: hashlib.sha256(v).hexdigest()[:16] for k, v in sources.items()}, "rows": rows,
    })  # fmt: skip
    print("| batch | baseline ms | current ms | current / baseline | W @ x.T ms | F.linear ms | current GB/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        m = r["median_ms"]
        print(f"| {r['batch']} | {m['baseline']:.1f} | {m['current']:.1f} | {r['current_vs_baseline']:.2f}x | "
              f"{m['W @ x.T']:.1f} | {m['F.linear']:.1f} | {weight_bytes / m['current'] / 1e6:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
