"""generate_candidates and collect_preferences on a tiny project, with each labelling backend."""

import json
from itertools import combinations
from pathlib import Path

import pytest
import torch
import yaml

from rlhf_core import kernels
from rlhf_core.artifacts import PreferenceFolder
from rlhf_core.config import load_params
from rlhf_core.precision import default_device
from rlhf_core.records import read_jsonl
from rlhf_core.schemas import Completion, Ranking

from .conftest import TINY_OVERRIDES, deep_update, isolate_env, make_project, rlhf, stage_metrics
from .test_preferences import salted_bundle

pytestmark = pytest.mark.slow
K = 4


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny project with base model, prompts and candidates, built once for this module."""
    root = make_project(tmp_path_factory.mktemp("collect") / "project")
    with pytest.MonkeyPatch.context() as patch:
        isolate_env(patch, root)
        patch.chdir(root)
        from rlhf_core.stages import base_model, generate_candidates, prompts

        params = load_params(root / "params.yaml")
        base_model.run(params)
        prompts.run(params)
        metrics = generate_candidates.run(params)
        yield root, metrics


@pytest.fixture
def in_project(project, monkeypatch):
    root, _ = project
    isolate_env(monkeypatch, root)
    monkeypatch.chdir(root)
    return root


def params_file(root: Path, name: str, overrides: dict) -> Path:
    """A params file for one test: the project's params plus ``overrides``, outputs in their own folders."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params = deep_update(params, {"paths": {"preferences": f"data/{name}/preferences", "metrics": f"metrics/{name}"}})
    params = deep_update(params, overrides)
    path = root / f"params-{name}.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def collect(root: Path, name: str, overrides: dict) -> tuple[dict, Path]:
    from rlhf_core.stages import collect_preferences

    params = load_params(params_file(root, name, overrides))
    return collect_preferences.run(params), Path(params.paths.preferences)


def rejects_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in PreferenceFolder(folder).rejects.read_text().splitlines()]


def test_generate_candidates_writes_k_completions_per_prompt(project):
    root, metrics = project
    folder = root / "data" / "candidates"
    completions = read_jsonl(folder / "completions.jsonl", Completion)
    prompts = TINY_OVERRIDES["candidates"]["max_prompts"]
    assert metrics["candidates/prompts"] == prompts and metrics["candidates/completions"] == prompts * K == len(completions)
    assert metrics["candidates/tokens_per_second"] > 0 and metrics["candidates/tokens"] > 0
    assert metrics["candidates/policy_version"].startswith("base:")
    assert (metrics["candidates/dtype"], metrics["candidates/device"]) == ("float32", default_device().type)
    assert metrics["candidates/decode_linears"] == kernels.decode_path(torch.float32, default_device())
    assert not (folder / "rankings.jsonl").exists()
    assert len({c.id for c in completions}) == len(completions)
    max_new = TINY_OVERRIDES["candidates"]["max_new_tokens"]
    for completion in completions:
        assert completion.policy_version == metrics["candidates/policy_version"]
        assert completion.seed == 0 and 0 < completion.num_tokens <= max_new and completion.finished is not None
    by_prompt = {}
    for completion in completions:
        by_prompt[completion.prompt_id] = by_prompt.get(completion.prompt_id, 0) + 1
    assert set(by_prompt.values()) == {K}
    saved = stage_metrics(root).read("generate_candidates")
    assert saved["candidates/completions"] == prompts * K


def test_simulated_backend(in_project):
    metrics, out = collect(in_project, "simulated", {"labeling": {"backend": "simulated", "overlap_fraction": 0.5}})
    rankings, pairs = PreferenceFolder(out).read_rankings(), PreferenceFolder(out).read_pairs()
    prompts = TINY_OVERRIDES["candidates"]["max_prompts"]
    assert metrics["preferences/rankings"] == len(rankings) == prompts + prompts // 2
    strict = sum(a != b for r in rankings for a, b in combinations(r.rank_of().values(), 2))
    assert metrics["preferences/pairs"] == len(pairs) == strict
    assert all(r.source == "simulated" and len(r.completion_ids) == K for r in rankings)
    assert {p.margin for p in pairs} <= {1.0, 2.0, 3.0}
    assert 0 <= metrics["preferences/agreement"] <= 1 and metrics["preferences/agreement_comparisons"] == prompts // 2 * 6
    assert "preferences/krippendorff_alpha" in metrics and metrics["preferences/agreement_stderr"] > 0
    assert 0 <= metrics["preferences/gold_accuracy"] <= 1 and metrics["preferences/rejects"] == 0
    assert stage_metrics(in_project, "params-simulated.yaml").read("collect_preferences") == metrics
    # Deterministic by seed: a second run ranks the same way.
    _, again = collect(in_project, "simulated-again", {"labeling": {"backend": "simulated", "overlap_fraction": 0.5}})
    assert [r.completion_ids for r in PreferenceFolder(again).read_rankings()] == [r.completion_ids for r in rankings]


def test_human_backend_keeps_good_records_and_reports_bad_ones(in_project):
    salted_bundle(in_project / "data" / "labels-salted")
    overrides = {"paths": {"label_export": "data/labels-salted"}, "labeling": {"backend": "human", "max_text_chars": 200}}
    metrics, out = collect(in_project, "human", overrides)
    assert [r.id for r in PreferenceFolder(out).read_rankings()] == ["r1", "r2", "r10"]
    assert metrics["preferences/pairs"] == 9 and metrics["preferences/prompts"] == 2
    assert metrics["preferences/agreement"] == 1.0  # r1 and r10: two annotators, same order
    assert "preferences/gold_accuracy" not in metrics
    rejects = rejects_of(out)
    assert metrics["preferences/rejects"] == len(rejects) == 14
    assert metrics["preferences/rejects_duplicate"] == 4 and metrics["preferences/rejects_too_few"] == 1
    lines = {(Path(r["file"]).name, r["line"]) for r in rejects}
    assert ("rankings.jsonl", 8) in lines and ("completions.jsonl", 7) in lines


def test_human_backend_leaves_out_the_blind_evaluation_task(in_project):
    """Labels of evaluate's side-by-side task come back through the same export; they must not train the reward model."""
    from rlhf_core.evaluation.human_eval import SOURCE
    from rlhf_core.preferences import PreferenceBundle
    from rlhf_core.schemas import Prompt

    bundle = PreferenceBundle()
    for pid, source in (("train-1", "human"), ("train-2", "human"), ("eval-1", SOURCE)):
        bundle.prompts.append(Prompt(id=pid, text=f"Question {pid}?", source=source))
        ids = [f"{pid}-{i}" for i in range(3)]
        bundle.completions += [
            Completion(id=c, prompt_id=pid, text=f"Answer {c}.", policy_version="blind" if source == SOURCE else "base")
            for c in ids
        ]
        bundle.rankings.append(
            Ranking(id=f"r-{pid}", prompt_id=pid, completion_ids=ids, ranks=[1, 2, 3], annotator_id="ann", source="human")
        )
    bundle.write(in_project / "data" / "labels-with-eval")
    overrides = {"paths": {"label_export": "data/labels-with-eval"}, "labeling": {"backend": "human"}}
    metrics, out = collect(in_project, "human-eval-left-out", overrides)
    pairs = PreferenceFolder(out).read_pairs()
    assert {p.prompt_id for p in pairs} == {"train-1", "train-2"} and len(pairs) == 6
    assert metrics["preferences/human_eval_rankings_left_out"] == 1
    assert metrics["preferences/prompts"] == 2 and metrics["preferences/completions"] == 6
    assert all(c.prompt_id != "eval-1" for c in PreferenceFolder(out).read_completions())


def test_import_backend_reads_trl_jsonl(in_project):
    pytest.importorskip("rlhf_core.importers")
    folder = in_project / "data" / "imports"
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        json.dumps({"prompt": f"Question {i}?", "chosen": f"A clear answer {i}.", "rejected": f"meh {i}"})
        for i in range(5)
    ]
    rows.insert(2, "{broken")
    rows.append(json.dumps({"prompt": "Empty?", "chosen": "", "rejected": "x"}))
    (folder / "trl.jsonl").write_text("\n".join(rows) + "\n")
    rows.append(json.dumps({"prompt": "Invisible?", "chosen": "\u200b", "rejected": "x"}))
    (folder / "trl.jsonl").write_text("\n".join(rows) + "\n")
    metrics, out = collect(in_project, "import", {"labeling": {"backend": "import", "import_file": "trl.jsonl"}})
    # an empty answer is a human judgement like any other; an invisible one is not text
    assert metrics["preferences/rankings"] == metrics["preferences/pairs"] == 6
    pairs = PreferenceFolder(out).read_pairs()
    assert {p.chosen for p in pairs} == {f"A clear answer {i}." for i in range(5)} | {""}
    assert {r["line"] for r in rejects_of(out)} >= {3, 8}


def test_nothing_usable_fails_with_one_clear_line(in_project):
    folder = in_project / "data" / "labels-bad"
    folder.mkdir(parents=True)
    (folder / "prompts.jsonl").write_text(json.dumps({"id": "p1", "text": "Hi?"}) + "\n")
    (folder / "rankings.jsonl").write_text(
        json.dumps({"id": "r1", "prompt_id": "p1", "completion_ids": ["a", "b"], "annotator_id": "x"}) + "\n{bad\n"
    )
    params = params_file(in_project, "bad", {"paths": {"label_export": "data/labels-bad"}, "labeling": {"backend": "human"}})
    done = rlhf("collect-preferences", "--params", str(params), cwd=in_project, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "nothing usable" in done.stderr
    rejects = rejects_of(in_project / "data" / "bad" / "preferences")
    assert {(r["line"], r["kind"]) for r in rejects} == {(1, "unknown_id"), (2, "bad_json")}


def test_agreement_standard_error_is_clustered_by_prompt():
    from rlhf_core.stages.collect_preferences import agreement_standard_error

    def ranking(rid, prompt, who, order):
        return Ranking(id=rid, prompt_id=prompt, completion_ids=order, annotator_id=who)

    agree = [ranking("a1", "p1", "a", ["x", "y", "z", "w"]), ranking("b1", "p1", "b", ["x", "y", "z", "w"])]
    disagree = [ranking("a2", "p2", "a", ["x", "y", "z", "w"]), ranking("b2", "p2", "b", ["w", "z", "y", "x"])]
    # Prompts: agreement 1 and 0 on 6 comparisons each; pooled 0.5; variance 2/1 * (3^2 + 3^2) / 12^2 = 0.25.
    assert agreement_standard_error(agree + disagree) == pytest.approx(0.5)
    assert agreement_standard_error(agree) is None
