"""The project's one compiled CPU kernel: the linear layers of a decode step, fp32 or bf16 (``skinny_gemm.c``).

A decode step multiplies every weight of the model by a handful of rows (the
batch), so it is bound by reading the weights; MKL's sgemm streams them at
5-12 GB/s on a 2-core EPYC, a third of what the memory gives (bench/README.md,
``sampling.py``).  :func:`skinny_gemm` streams fp32 ones at 16-20 GB/s at 8 rows.

It is built on first use with the machine's C compiler (``$CC``, else ``cc``;
OpenMP on the thread pool torch already loaded) and cached under
``$RLHF_KERNEL_DIR`` (default ``$XDG_CACHE_HOME/rlhf-pipeline/kernels``), one
build per source, compiler and flags.  The build holds an AVX-512 and an AVX2
path and runs the one the CPU supports; both give the same bits
(``skinny_gemm.c`` says how), so two x86-64 machines with FMA get the same
numbers from one commit.  Where it cannot run - no compiler, neither AVX-512
nor AVX2 with FMA, not x86-64 Linux, a build that fails its check against
torch, or ``RLHF_KERNELS=off`` - callers keep torch's matmul, and :func:`status`
says why; the sampling stages record it (``<stage>/decode_linears``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("skinny_gemm.c")
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-Wno-psabi")
ISAS = {512: "avx512", 256: "avx2"}


class SkinnyGemm:
    """``x @ weight.T (+ bias)`` for CPU tensors through the compiled kernel: an fp32 or bf16 weight (contiguous,
    its width a multiple of 16, :meth:`fits`), computed in fp32 and returned in the weight's dtype."""

    def __init__(self, library: ctypes.CDLL, path: Path, avx2: bool = False):
        self.path = path
        self.isa = "avx2" if avx2 else ISAS[library.skinny_gemm_isa()]
        suffix = "_avx2" if avx2 else ""  # that path whatever the CPU (for tests)
        self._gemms = {torch.float32: getattr(library, "skinny_gemm" + suffix),
                       torch.bfloat16: getattr(library, "skinny_gemm_bf16" + suffix)}  # fmt: skip
        for gemm in self._gemms.values():
            gemm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
            gemm.restype = None

    @staticmethod
    def fits(weight: torch.Tensor) -> bool:
        return (weight.dtype in (torch.float32, torch.bfloat16) and weight.device.type == "cpu" and weight.dim() == 2
                and weight.is_contiguous() and weight.shape[1] % 16 == 0)  # fmt: skip

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self.fits(weight) or x.device.type != "cpu":
            raise ValueError("skinny_gemm takes CPU tensors and a contiguous fp32 or bf16 weight whose width divides by 16")
        return self.run(x, weight, bias)

    def run(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`__call__` without its checks, for a caller that checked the weight once (the sampler's layers)."""
        out_features, width = weight.shape
        flat = x.reshape(-1, width).to(torch.float32).contiguous()
        out = torch.empty(flat.shape[0], out_features)
        bias = None if bias is None else bias.to(torch.float32).contiguous()
        self._gemms[weight.dtype](weight.data_ptr(), flat.data_ptr(), out.data_ptr(), None if bias is None else bias.data_ptr(),
                                  flat.shape[0], out_features, width, torch.get_num_threads())  # fmt: skip
        return out.to(weight.dtype).reshape(*x.shape[:-1], out_features)


def cache_dir() -> Path:
    if os.environ.get("RLHF_KERNEL_DIR"):
        return Path(os.environ["RLHF_KERNEL_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "rlhf-pipeline" / "kernels"


def build(directory: Path | None = None, flags: tuple[str, ...] = FLAGS, source: Path = SOURCE) -> Path:
    """Compile ``source`` (default ``skinny_gemm.c``; another version of it for a benchmark) unless a build for this
    source, compiler and flags is cached, and return the shared library's path; a :class:`RuntimeError` saying why
    when it cannot."""
    try:
        command = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc") or "cc"]
    except ValueError as exc:
        raise RuntimeError(f"CC={os.environ['CC']!r}: {exc}") from exc
    compiler = command[0]
    if not shutil.which(compiler):
        raise RuntimeError("no C compiler (set CC, or install gcc)")
    text = source.read_bytes()
    found = Path(shutil.which(compiler)).resolve().stat()  # another compiler at the same path: built again
    stamp = f"{' '.join(command)} {found.st_size} {found.st_mtime_ns} {' '.join(flags)}".encode()
    key = hashlib.sha256(text + b"\0" + stamp)
    directory = directory or cache_dir()
    path = directory / f"skinny_gemm-{key.hexdigest()[:16]}.so"
    if path.exists():
        return path
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=directory, prefix=".skinny_gemm-", suffix=".so")
        os.close(handle)
    except OSError as exc:
        raise RuntimeError(f"cannot write to {directory}: {exc}") from exc
    try:
        done = subprocess.run([*command, *flags, str(source), "-o", partial], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {(done.stderr or done.stdout).strip()[-400:]}")
        os.replace(partial, path)  # whole or not at all, whatever runs beside us
    finally:
        Path(partial).unlink(missing_ok=True)
    return path


def _check(gemm: SkinnyGemm) -> None:
    """The build against torch's matmul on shapes with every edge (a row tail, a weight tail, fewer weight rows
    than a block, bias), with fp32 weights and with bf16 ones (the result rounded to bf16: within one bf16 step)."""
    generator = torch.Generator().manual_seed(0)
    for rows, out_features, width in ((1, 7, 32), (11, 50, 48), (9, 3, 16)):
        x = torch.randn(rows, width, generator=generator)
        weight = torch.randn(out_features, width, generator=generator)
        bias = torch.randn(out_features, generator=generator)
        half = weight.to(torch.bfloat16)
        checks = ((gemm(x, weight, bias), torch.addmm(bias, x, weight.T), 1e-5),
                  (gemm(x, half, bias).float(), torch.addmm(bias, x, half.float().T), 1e-2))  # fmt: skip
        for got, want, tolerance in checks:
            if not torch.allclose(got, want, rtol=tolerance, atol=tolerance):
                raise RuntimeError(f"the build at {gemm.path} disagrees with torch (max error {(got - want).abs().max():.2e})")


@lru_cache(maxsize=1)
def _load() -> tuple[SkinnyGemm | None, str]:
    if os.environ.get("RLHF_KERNELS", "on") == "off":
        return None, "off: RLHF_KERNELS=off"
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return None, f"off: built for x86-64 Linux only (this is {sys.platform} {platform.machine()})"
    try:
        path = build()
        try:
            library = ctypes.CDLL(str(path))
        except OSError:  # a damaged cached file: build it again
            path.unlink(missing_ok=True)
            path = build()
            library = ctypes.CDLL(str(path))
        isa = library.skinny_gemm_isa()
        if isa not in ISAS:
            return None, "off: the CPU has neither AVX-512 nor AVX2 with FMA"
        gemm = SkinnyGemm(library, path)
        _check(gemm)
    except (RuntimeError, OSError) as exc:
        return None, f"off: {exc}"
    return gemm, gemm.isa


def skinny_gemm() -> SkinnyGemm | None:
    """The kernel, built and checked on first call; None where it cannot run (:func:`status` says why)."""
    return _load()[0]


def status() -> str:
    """``avx512`` or ``avx2`` (the kernel's path on this machine), or ``off: <why>``."""
    return _load()[1]


def decode_path(dtype: torch.dtype, device: torch.device | str) -> str:
    """How the sampler's one-token steps run their linear layers for weights of ``dtype`` on ``device``: the
    kernel's path (``avx512``, ``avx2``), ``off: <why>`` on a CPU where it cannot run, or ``torch`` (a GPU)."""
    if torch.device(device).type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return "torch"
    return status()
