"""The base_model and prompts stages through the real CLI on a tiny model."""

import pytest

from rlhf_core.artifacts import PromptSplit

from .conftest import rlhf, stage_metrics

pytestmark = pytest.mark.slow


def test_base_model_and_prompts_stages(tiny_project):
    rlhf("base-model", cwd=tiny_project)
    base = stage_metrics(tiny_project).read("base_model")
    assert base["base_model/source"] == "tiny"
    assert base["base_model/parameters"] > 1000 and base["base_model/dtype"] == "float32"
    assert (tiny_project / "models" / "base" / "model.safetensors").exists()
    assert not list((tiny_project / "models" / "base").glob("*.bin"))

    from rlhf_core.base_model import load_causal_lm, load_tokenizer

    # loads from the safetensors written (no timing here: a cold import of transformers alone can take seconds)
    assert load_causal_lm(tiny_project / "models" / "base").num_parameters() == base["base_model/parameters"]
    tokenizer = load_tokenizer(tiny_project / "models" / "base")
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<|im_end|>"

    rlhf("prompts", cwd=tiny_project)
    metrics = stage_metrics(tiny_project).read("prompts")
    assert metrics["prompts/train"] + metrics["prompts/eval"] == metrics["prompts/kept"] >= 500
    train = PromptSplit(tiny_project / "data" / "prompts").train.read_text().splitlines()
    assert len(train) == metrics["prompts/train"]

    import mlflow

    runs = mlflow.search_runs(experiment_names=["rlhf"])
    assert set(runs["tags.stage"]) == {"base_model", "prompts"}
    for column in ("tags.git_commit", "tags.params_hash", "tags.input_hash"):
        assert runs[column].notna().all()
    assert (runs["status"] == "FINISHED").all()
    prompts_run = runs[runs["tags.stage"] == "prompts"].iloc[0]
    assert prompts_run["metrics.prompts/train"] == metrics["prompts/train"]


def test_unknown_base_model_source_is_one_clear_line(tiny_project):
    import yaml

    params = yaml.safe_load((tiny_project / "params.yaml").read_text())
    params["base_model"]["source"] = str(tiny_project / "no-such-model")
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(params))
    done = rlhf("base-model", cwd=tiny_project, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "no-such-model" in done.stderr
