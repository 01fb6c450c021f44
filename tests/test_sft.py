"""SFT: answer-only loss on the sampler's own text, the ``rlhf sft`` stage, and the later stages starting from it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from mlflow import MlflowClient

from rlhf_core import tracking
from rlhf_core.artifacts import Layout
from rlhf_core.config import SFTConfig, load_params
from rlhf_core.generation import encode_queries
from rlhf_core.records import write_jsonl
from rlhf_core.schemas import Demonstration, Prompt

from .conftest import rlhf

ANSWERS = [
    "Start with a small pot of basil on a sunny windowsill and water it when the soil feels dry.",
    "Walk for twenty minutes after dinner; it is easy to keep up and helps you sleep.",
    "Write the three most important tasks on paper first, then do the hardest one before lunch.",
    "Keep bread in a paper bag at room temperature, or freeze slices for longer storage.",
    "Use a short, memorable passphrase of four random words and a password manager for the rest.",
    "Stretch your calves and hamstrings gently for thirty seconds each after every run.",
]


def _demo(i: int, prompt: str, answer: str) -> Demonstration:
    return Demonstration(id=f"d{i}", prompt_id=f"p{i}", prompt=prompt, completion=answer, source="written")


def _sft_cfg(**overrides) -> SFTConfig:
    """The sft section of the tiny test params (params.yaml plus tests/conftest.py's overrides) with ``overrides``."""
    from .conftest import REPO, TINY_OVERRIDES, deep_update

    section = deep_update(yaml.safe_load((REPO / "params.yaml").read_text())["sft"], TINY_OVERRIDES["sft"])
    return SFTConfig.model_validate(deep_update(section, overrides))


# --- answer-only loss ----------------------------------------------------------------------------------------------


def test_labels_cover_exactly_the_answer_and_its_stop_token_after_the_samplers_own_prompt(tiny_base_model, tmp_path):
    from rlhf_core.base_model import load_tokenizer
    from rlhf_core.sft import build_trainer

    tokenizer = load_tokenizer(tiny_base_model)
    demos = [_demo(0, "How do I grow herbs indoors?", ANSWERS[0]), _demo(1, "A habit for better sleep?", ANSWERS[1])]
    trainer, truncated = build_trainer(tiny_base_model, _sft_cfg(source="written"), demos, [], tmp_path / "ckpt")
    assert truncated == 0
    for demo, row in zip(demos, trainer.train_dataset):
        query_ids = encode_queries(tokenizer, [demo.prompt])[0][0].tolist()  # what the sampler feeds the policy
        answer_ids = tokenizer(demo.completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        assert row["input_ids"] == query_ids + answer_ids
        assert row["labels"] == [-100] * len(query_ids) + answer_ids  # no loss on any prompt token
    # the batch TRL's collator builds keeps that mask and adds none on padding
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    keep = batch["labels"] != -100
    assert int(keep.sum()) == sum(sum(label != -100 for label in row["labels"]) for row in trainer.train_dataset)
    assert bool((batch["attention_mask"][keep] == 1).all())


def test_trl_settings_follow_the_dtype_knob_and_keep_checkpointing_off(tmp_path):
    from rlhf_core.sft import trainer_args

    fp32, bf16 = trainer_args(_sft_cfg(), tmp_path), trainer_args(_sft_cfg(dtype="bfloat16"), tmp_path)
    assert fp32.bf16 is False and bf16.bf16 is True  # TRL's own default would be bf16 on
    assert fp32.completion_only_loss is True and fp32.packing is False and fp32.gradient_checkpointing is False
    assert fp32.max_length == _sft_cfg().max_length


def test_freeze_trains_only_the_upper_layers_and_lora_adapters_are_merged_away(tiny_base_model):
    from rlhf_core.sft import prepare_policy

    model, peft = prepare_policy(tiny_base_model, _sft_cfg(mode="freeze", freeze_layers=1))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert peft is None and trainable and all(".layers.1." in name or "norm" in name for name in trainable)
    assert not model.get_input_embeddings().weight.requires_grad
    _, peft = prepare_policy(tiny_base_model, _sft_cfg(mode="lora", freeze_layers=1))
    assert peft.layers_to_transform == [1]
    from rlhf_core.errors import ConfigError

    with pytest.raises(ConfigError, match="sft.freeze_layers=2"):
        prepare_policy(tiny_base_model, _sft_cfg(mode="freeze", freeze_layers=2))


def test_validation_holds_out_whole_prompts():
    from rlhf_core.sft import split_by_prompt

    demos = [_demo(i, f"Question {i // 2}?", f"Answer number {i}.") for i in range(20)]
    for i, demo in enumerate(demos):
        demos[i] = demo.model_copy(update={"prompt_id": f"p{i // 2}"})
    train, validation = split_by_prompt(demos, 0.2, seed=0)
    assert len(train) + len(validation) == 20 and len(validation) == 4
    assert not {d.prompt_id for d in train} & {d.prompt_id for d in validation}
    assert split_by_prompt(demos[:1], 0.2, seed=0) == (demos[:1], [])


def test_best_of_n_takes_a_finished_gold_best_sample_per_prompt(tiny_base_model, monkeypatch):
    from rlhf_core import gold
    from rlhf_core.sft import best_of_n_demonstrations

    monkeypatch.setattr(gold, "gold_score", lambda prompt, text: float(len(text)))  # longest wins
    prompts = [Prompt(id=f"t{i}", text=f"Tell me about {i}.") for i in range(3)]
    demos, stats = best_of_n_demonstrations(tiny_base_model, prompts, _sft_cfg(simulated={"n": 3, "prompts": 2}))
    assert [d.prompt_id for d in demos.demonstrations] == ["t0", "t1"] and demos.rows == 2
    assert all(d.source == "simulated:best_of_3" for d in demos.demonstrations)
    assert stats["gold_best"] >= stats["gold_first"]


# --- the stage -----------------------------------------------------------------------------------------------------


@pytest.fixture
def project(work_env, tiny_base_model):
    """Tiny base model and the prompt split; written demonstrations for 6 training prompts, one eval prompt, one repeat."""
    params = yaml.safe_load((work_env / "params.yaml").read_text())
    params["paths"]["base_model"] = "models/base"
    params["sft"]["source"] = "written"
    (work_env / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(tiny_base_model, work_env / "models/base")
    layout = Layout(load_params(work_env / "params.yaml").paths)
    train = [Prompt(id=f"t{i}", text=f"Give me one tip about topic {i}, please.") for i in range(8)]
    evaluation = [Prompt(id=f"e{i}", text=f"What is {i} plus {i}?") for i in range(5)]
    layout.prompts.write(train, evaluation, [])
    rows = [{"prompt_id": p.id, "prompt": p.text, "completion": a, "source": "written"} for p, a in zip(train, ANSWERS)]
    rows.append({"prompt_id": "e0", "prompt": evaluation[0].text, "completion": "Zero plus zero is zero.", "source": "written"})
    rows.append(dict(rows[0]))
    write_jsonl(layout.demonstrations, rows)
    return work_env


def _set(root, **sft):
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["sft"].update(sft)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_rlhf_sft_trains_reports_saves_and_registers_a_tagged_policy_version(project):
    rlhf("sft", cwd=project)
    layout = Layout(load_params(project / "params.yaml").paths)
    metrics = layout.metrics.read("sft")
    assert metrics["sft/enabled"] is True and metrics["sft/source"] == "written"
    counts = {k.removeprefix("sft/demonstrations/"): v for k, v in metrics.items() if k.startswith("sft/demonstrations/")}
    assert counts["rows"] == 8 and counts["kept"] == 6 and counts["eval_prompt"] == 1 and counts["duplicate"] == 1
    assert metrics["sft/train_examples"] + metrics["sft/heldout_examples"] == 6 and metrics["sft/heldout_examples"] >= 1
    assert metrics["sft/heldout_perplexity"] == pytest.approx(2.718281828 ** metrics["sft/heldout_loss"])
    assert isinstance(metrics["sft/heldout_loss_base"], float) and metrics["sft/train_steps"] >= 1
    low, rate, high = (metrics[f"sft/eval/gold_win_rate_vs_base{s}"] for s in ("_low", "", "_high"))
    assert 0 <= low <= rate <= high <= 1 and metrics["sft/eval/gold_win_rate_vs_base_n"] == 4
    assert {metrics["sft/dtype"], metrics["sft/device"]} <= {"float32", "cpu", "cuda"}

    folder = layout.sft_model.folder
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists() and not list(folder.glob("*.bin"))
    rejects = [json.loads(line) for line in layout.sft_model.rejects.read_text().splitlines()]
    assert sorted(r["kind"] for r in rejects) == ["duplicate", "eval_prompt"]
    assert metrics["sft/content_hash"] == tracking.hash_paths([folder])

    version = MlflowClient().get_model_version(tracking.POLICY_MODEL, str(metrics["sft/registered_version"]))
    assert version.tags["stage"] == "sft" and version.tags["content_hash"] == metrics["sft/content_hash"]
    assert layout.starting_policy == layout.sft_model


@pytest.mark.slow
def test_no_usable_demonstrations_is_one_line_naming_the_source(project):
    _set(project, source="labels")
    done = rlhf("sft", cwd=project, check=False)
    assert done.returncode == 2 and "data/labels/demonstrations.jsonl" in done.stderr and "sft.source=none" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_candidates_and_ppo_start_from_the_sft_model_and_switching_it_off_restores_the_base(project):
    from .conftest import hand_over_reward_model

    layout = Layout(load_params(project / "params.yaml").paths)
    rlhf("sft", cwd=project)
    sft_label = f"sft:{tracking.hash_paths([layout.sft_model.folder])[:12]}"
    rlhf("generate-candidates", cwd=project)
    assert {c.policy_version for c in layout.candidates.read_completions()} == {sft_label}

    # PPO starts from the SFT weights and keeps them as its frozen reference: the KL penalty is measured against SFT.
    from rlhf_core.base_model import load_causal_lm
    from rlhf_core.ppo.policy import build_actor_critic

    actor = build_actor_critic(layout.starting_policy.folder, load_params(project / "params.yaml").ppo, torch.device("cpu"))
    reference = list(actor.reference["layers"].parameters())  # the layers above the shared frozen trunk
    for path, same in ((layout.sft_model.folder, True), (layout.base_model.folder, False)):
        upper = load_causal_lm(path, dtype="float32").model.layers[1:].parameters()
        assert all(torch.equal(a, b) for a, b in zip(reference, upper)) is same

    from rlhf_core.reward import RewardModel
    from rlhf_core.reward.build import load_sequence_classifier
    from rlhf_core.reward.model import reward_tokenizer

    tokenizer = reward_tokenizer(layout.base_model.folder, 64)
    RewardModel(load_sequence_classifier(layout.base_model.folder, tokenizer.pad_token_id), tokenizer).save(layout.reward_model.folder)
    hand_over_reward_model(project, layout.reward_model.folder)
    _ppo_one_update(project)
    rlhf("ppo", cwd=project)
    ppo = layout.metrics.read("ppo")
    assert ppo["ppo/init_policy"] == sft_label
    assert MlflowClient().get_model_version(tracking.POLICY_MODEL, str(ppo["ppo/registered_version"])).tags["init_policy"] == sft_label

    _set(project, source="none")
    rlhf("sft", cwd=project)
    assert layout.metrics.read("sft") == {"sft/enabled": False}
    assert not layout.sft_model.exists() and layout.sft_model.off_note.exists()
    assert layout.starting_policy == layout.base_model
    rlhf("generate-candidates", cwd=project)
    assert {c.policy_version.split(":")[0] for c in layout.candidates.read_completions()} == {"base"}


def _ppo_one_update(root):
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["ppo"].update({"updates": 1, "gold_eval_prompts": 0})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

