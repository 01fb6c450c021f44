"""The one dtype/device rule: named alike in every section, fp32 by default, nothing chosen from the CPU."""

from __future__ import annotations

import pytest
import torch
import yaml

from rlhf_core import precision
from rlhf_core.config import load_params
from rlhf_core.errors import ConfigError

from .conftest import REPO

#: every section with a numeric-path knob, and what it governs
DTYPE_SECTIONS = ("base_model", "candidates", "reward", "ppo", "evaluate")


def test_every_numeric_path_knob_is_dtype_defaulting_to_float32_in_code_and_params():
    params = load_params(REPO / "params.yaml")
    for section in DTYPE_SECTIONS:
        model = type(getattr(params, section))
        assert "bf16" not in model.model_fields, section
        assert model.model_fields["dtype"].default == "float32" == getattr(params, section).dtype, section


@pytest.mark.parametrize("section", DTYPE_SECTIONS)
def test_auto_is_refused_with_one_line_naming_the_key(tmp_path, section):
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data[section]["dtype"] = "auto"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError, match=rf"{section}\.dtype") as info:
        load_params(path)
    assert "\n" not in str(info.value)


def test_no_numeric_path_is_chosen_from_cpu_flags():
    """The same commit must run the same numbers on every CPU: the library never looks at the CPU's flags."""
    readers = [p.relative_to(REPO) for p in (REPO / "rlhf_core").rglob("*.py") if "cpuinfo" in p.read_text()]
    assert not readers, f"{readers} read CPU flags"


def test_torch_dtype_names_the_allowed_values():
    assert precision.torch_dtype("float32") == torch.float32 and precision.torch_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ConfigError, match="float16.*expected one of float32, bfloat16"):
        precision.torch_dtype("float16")


@pytest.mark.parametrize("dtype, expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_autocast_runs_the_named_path(dtype, expected):
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with precision.autocast(dtype, torch.device("cpu")):
        assert (a @ b).dtype == expected
    assert (a @ b).dtype == torch.float32  # nothing leaks out of the block


def test_record_names_dtype_and_device_type():
    assert precision.record("ppo", "bfloat16", torch.device("cpu")) == {"ppo/dtype": "bfloat16", "ppo/device": "cpu"}
    assert precision.record("eval", "float32", "cuda:1") == {"eval/dtype": "float32", "eval/device": "cuda"}


def test_a_sampling_stage_records_how_its_decode_steps_ran_their_linear_layers():
    from rlhf_core import kernels
    from rlhf_core.decoder import sampling_record

    fp32 = sampling_record("candidates", "float32", "cpu")["candidates/decode_linears"]
    assert fp32 == kernels.status()  # avx512, avx2, or off: <why>
    assert fp32 in ("avx512", "avx2") or fp32.startswith("off: ")
    assert sampling_record("ppo", "bfloat16", "cpu") == {"ppo/dtype": "bfloat16", "ppo/device": "cpu",
                                                         "ppo/decode_linears": kernels.status()}  # fmt: skip
    assert sampling_record("eval", "float32", "cuda:0") == {"eval/dtype": "float32", "eval/device": "cuda",
                                                            "eval/decode_linears": "torch"}  # fmt: skip
    with pytest.raises(ConfigError, match="float16"):
        sampling_record("eval", "float16", "cpu")