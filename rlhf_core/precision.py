"""The numeric path of every stage: one ``dtype`` knob, named alike in ``candidates``, ``reward``, ``ppo`` and ``evaluate``.

The value is ``float32`` (the default) or ``bfloat16``; nothing is chosen from
the hardware.  bf16 is fast only on some CPUs (AVX-512 BF16 or AMX: about 5x
fp32's matmul rate; without them about 5x slower, STACK.md), and a rule that
picked it from CPU flags made one commit give different numbers on different
machines of the same project, with no record of which path ran.  As a param,
a bf16 run is a different DVC experiment, and every stage records the dtype and
device it used (:func:`record`) in its metrics and MLflow params.

What ``bfloat16`` means follows from what the stage does with the model:

* sampling and scoring a policy (``candidates``, ``evaluate``): the weights are
  loaded in bf16 (:func:`torch_dtype`);
* training (``reward``, ``ppo``): mixed precision - weights and optimiser state
  stay fp32, forward passes run under bf16 autocast (:func:`autocast`).  A
  reward model is scored in the path it was trained and normalised in wherever
  it is loaded: its folder records that dtype, so mean 0 / std 1 of the base
  completions holds for every stage that reads it.

torch is imported lazily: ``rlhf_core.config`` takes :data:`Dtype` from here.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Literal, get_args

from rlhf_core.errors import ConfigError

if TYPE_CHECKING:
    import torch

Dtype = Literal["float32", "bfloat16"]
DTYPES: tuple[str, ...] = get_args(Dtype)


def torch_dtype(name: str) -> "torch.dtype":
    """The torch dtype called ``name`` (one of :data:`DTYPES`)."""
    import torch

    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def default_device() -> "torch.device":
    """Where models run: the GPU when there is one, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(name: str, device: "torch.device | str"):
    """Mixed precision for ``bfloat16`` (bf16 autocast on ``device``'s type); plain fp32 for ``float32``."""
    import torch

    if torch_dtype(name) == torch.float32:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def record(prefix: str, name: str, device: "torch.device | str") -> dict[str, str]:
    """``{<prefix>/dtype, <prefix>/device}``: the numeric path a stage ran, for its metrics and MLflow params (a
    stage that samples records these through :func:`rlhf_core.decoder.sampling_record`, with its decode path)."""
    import torch

    torch_dtype(name)  # a misspelt name fails here, not in a metrics file
    return {f"{prefix}/dtype": name, f"{prefix}/device": torch.device(device).type}
