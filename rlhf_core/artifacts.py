"""Where every hand-off between stages lives, and how it is read and written.

Each artifact a stage writes or reads is declared once here: its folder or file
under ``paths:`` (params.yaml) and the file names inside it, with a typed read
and write.  Stages, bench scripts and tests take their paths from
:class:`Layout` instead of joining literal names, and ``dvc.yaml``'s deps and
outs are checked against :data:`STAGE_IO` (tests/test_layout.py), so a file
name is written in one place and DVC sees every hand-off.

The pipeline's list of stages is ``dvc.yaml``'s (:func:`pipeline_stages`); the
CLI, the Prefect flow and its tasks take theirs from it.

Types owned elsewhere keep their own reader and take their path from here:
model folders (:mod:`rlhf_core.reward.model`, :mod:`rlhf_core.ppo.policy`),
the reward release record (:mod:`rlhf_core.reward.release`) and the evaluation
summary (:mod:`rlhf_core.evaluation.summary`).  This module imports none of
them, so that every stage depending on it does not depend on all of them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from rlhf_core.errors import ConfigError, DataError
from rlhf_core.records import Reject, read_jsonl, write_jsonl, write_rejects
from rlhf_core.schemas import Completion, PreferencePair, Prompt, Ranking

#: The pipeline definition, next to the package (as ``accelerate/`` is, see :mod:`rlhf_core.launch`).
PIPELINE_FILE = Path(__file__).resolve().parents[1] / "dvc.yaml"

#: The three files of a preference bundle: labelling export, importers, candidates and the preference stage.
BUNDLE_FILES = {"prompts": "prompts.jsonl", "completions": "completions.jsonl", "rankings": "rankings.jsonl"}
REJECTS_FILE = "rejects.jsonl"
#: The file a model folder cannot be loaded without (Hugging Face layout).
MODEL_CONFIG_FILE = "config.json"
#: The labelling app's demonstrations in TRL's prompt-completion form, inside ``paths.label_export``.
LABEL_DEMONSTRATIONS_FILE = "demonstrations.jsonl"


def pipeline_stages(dvc_file: str | Path = PIPELINE_FILE) -> dict[str, dict]:
    """``dvc.yaml``'s stages in pipeline order: name -> definition (``cmd``, ``desc``, ``meta``, deps, outs...)."""
    path = Path(dvc_file)
    try:
        stages = (yaml.safe_load(path.read_text()) or {}).get("stages")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the pipeline definition ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(stages, dict) or not stages:
        raise ConfigError(f"{path}: no `stages:` mapping")
    return stages


def stage_command(stage: str) -> str:
    """The ``rlhf`` subcommand of a stage (``train_reward`` -> ``train-reward``)."""
    return stage.replace("_", "-")


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class CsvCurve:
    """A per-step CSV (a DVC plot): one header row, numbers in the cells, empty cells for unmeasured values."""

    path: Path

    def write(self, columns: list[str], rows: Iterable[Iterable[object]]) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(columns)
        writer.writerows(["" if v is None else f"{v:.6g}" if isinstance(v, float) else v for v in row] for row in rows)
        _atomic_text(self.path, buffer.getvalue())

    def read(self) -> list[dict[str, float | None]]:
        """The rows as numbers (empty cells become None); no file gives no rows."""
        if not self.path.exists():
            return []
        rows = []
        with self.path.open(newline="") as handle:
            for line, row in enumerate(csv.DictReader(handle), start=2):
                try:
                    rows.append({k: (float(v) if v not in ("", None) else None) for k, v in row.items() if k})
                except ValueError as exc:
                    raise DataError(f"{self.path}:{line}: not a number ({exc})") from None
        return rows


@dataclass(frozen=True)
class ModelFolder:
    """A saved model (safetensors + tokenizer); its loader and saver belong to the model's module."""

    folder: Path
    made_by: str

    @property
    def config(self) -> Path:
        return self.folder / MODEL_CONFIG_FILE

    def exists(self) -> bool:
        return self.config.exists()

    def require(self) -> Path:
        if not self.exists():
            raise DataError(f"{self.folder}: no model there (run `rlhf {stage_command(self.made_by)}` first)")
        return self.folder

    @property
    def kind(self) -> str:
        """How a policy started from this folder is labelled (``base``, ``sft``): the prefix of ``<kind>:<hash>``."""
        return self.made_by.removesuffix("_model")


@dataclass(frozen=True)
class SFTFolder(ModelFolder):
    """``paths.sft_model``: the fine-tuned policy with its demonstration rejects, or with sft off only :attr:`off_note`."""

    @property
    def rejects(self) -> Path:
        return self.folder / "demonstration_rejects.jsonl"

    @property
    def off_note(self) -> Path:
        """What the stage leaves when ``sft.source`` is none: DVC needs its output to exist, and no model is there."""
        return self.folder / "sft_off.json"


@dataclass(frozen=True)
class PromptSplit:
    """``paths.prompts``: the prompts stage's train/eval split and the prompts it rejected."""

    folder: Path

    @property
    def train(self) -> Path:
        return self.folder / "train.jsonl"

    @property
    def eval(self) -> Path:
        return self.folder / "eval.jsonl"

    @property
    def rejects(self) -> Path:
        return self.folder / REJECTS_FILE

    def write(self, train: list[Prompt], evaluation: list[Prompt], rejects: Iterable[Reject]) -> None:
        write_rejects(self.rejects, rejects)
        write_jsonl(self.train, train)
        write_jsonl(self.eval, evaluation)

    def read_train(self, *, required: bool = True) -> list[Prompt]:
        return self._read(self.train, required)

    def read_eval(self, *, required: bool = True) -> list[Prompt]:
        return self._read(self.eval, required)

    @staticmethod
    def _read(path: Path, required: bool) -> list[Prompt]:
        if not path.exists():
            if required:
                raise DataError(f"{path}: not found (run `rlhf prompts` first)")
            return []
        prompts = read_jsonl(path, Prompt)
        if required and not prompts:
            raise DataError(f"{path}: no prompts")
        return prompts


@dataclass(frozen=True)
class BundleFolder:
    """A folder in the bundle layout (:data:`BUNDLE_FILES`); the candidates have no rankings."""

    folder: Path

    @property
    def prompts(self) -> Path:
        return self.folder / BUNDLE_FILES["prompts"]

    @property
    def completions(self) -> Path:
        return self.folder / BUNDLE_FILES["completions"]

    @property
    def rankings(self) -> Path:
        return self.folder / BUNDLE_FILES["rankings"]

    def read_completions(self) -> list[Completion]:
        return read_jsonl(self.completions, Completion)

    def read_rankings(self) -> list[Ranking]:
        return read_jsonl(self.rankings, Ranking)

    def write_candidates(self, prompts: list[Prompt], completions: list[Completion]) -> None:
        write_jsonl(self.prompts, prompts)
        write_jsonl(self.completions, completions)


@dataclass(frozen=True)
class PreferenceFolder(BundleFolder):
    """``paths.preferences``: the validated bundle, its C(K,2) pairs and the records rejected on the way."""

    @property
    def pairs(self) -> Path:
        return self.folder / "pairs.jsonl"

    @property
    def rejects(self) -> Path:
        return self.folder / REJECTS_FILE

    def write_pairs(self, pairs: list[PreferencePair], rejects: Iterable[Reject]) -> None:
        write_jsonl(self.pairs, pairs)
        write_rejects(self.rejects, rejects)

    def read_pairs(self) -> list[PreferencePair]:
        return read_jsonl(self.pairs, PreferencePair)


@dataclass(frozen=True)
class EvaluationFolder:
    """``paths.evaluation``: the verdict ``promote`` reads, every scored sample and the numbers behind the plots."""

    folder: Path

    @property
    def summary(self) -> Path:
        return self.folder / "summary.json"

    @property
    def samples(self) -> Path:
        return self.folder / "samples.jsonl"

    @property
    def plot_data(self) -> Path:
        return self.folder / "plot_data"

    @property
    def human_eval(self) -> Path:
        return self.folder / "human_eval"


#: The optimisers whose training figures ppo writes under their own prefix (``ppo.algorithm``: ``ppo/…``, ``rloo/…``).
OPTIMISERS = ("ppo", "rloo", "grpo", "dpo")


def _trained(name: str) -> tuple[str, ...]:
    return tuple(f"{algorithm}/{name}" for algorithm in OPTIMISERS)


#: Each stage's headline figures: ``metrics/<stage>.json`` (what ``dvc metrics show`` and ``dvc exp show`` print)
#: nested by topic, each leaf naming its flat key in the stage's full metrics (or alternatives: the first one the
#: stage wrote).  DVC prints one column per leaf, as wide as its dotted name or value plus four spaces, so a
#: stage gets a few short-named figures (within ~120 characters with its path); the rest, values set in
#: params.yaml and wall-clock times, stay in ``<stage>.detail.json`` and MLflow.
HEADLINES: dict[str, dict] = {
    "base_model": {
        "source": "base_model/source", "dtype": "base_model/dtype", "params": "base_model/parameters",
        "layers": "base_model/num_layers", "hidden": "base_model/hidden_size",
    },
    "prompts": {"train": "prompts/train", "eval": "prompts/eval", "rejected": "prompts/rejected", "total": "prompts/total"},
    "sft": {
        "enabled": "sft/enabled", "loss": {"sft": "sft/heldout_loss", "base": "sft/heldout_loss_base"},
        "gold": {"win": "sft/eval/gold_win_rate_vs_base", "lo": "sft/eval/gold_win_rate_vs_base_low",
                 "hi": "sft/eval/gold_win_rate_vs_base_high"},
        "examples": "sft/train_examples", "dtype": "sft/dtype", "version": "sft/registered_version",
    },
    "generate_candidates": {
        "completions": "candidates/completions", "tokens": "candidates/mean_tokens", "finished": "candidates/finished_rate",
        "empty": "candidates/empty_rate", "policy": "candidates/policy_version", "dtype": "candidates/dtype",
        "tok_s": "candidates/tokens_per_second", "skipped": "candidates/skipped",
    },
    "collect_preferences": {
        "backend": "preferences/backend", "pairs": "preferences/pairs", "rejects": "preferences/rejects",
        "agree": {"rate": "preferences/agreement", "alpha": "preferences/krippendorff_alpha"},
        "ties": "preferences/tie_rate", "longer": "preferences/longer_chosen_rate", "gold": "preferences/gold_accuracy",
    },
    "train_reward": {
        "acc": {"heldout": "reward/accuracy", "gold": "reward/gold_accuracy"}, "ece": "reward/calibration_ece",
        "loss": "reward/train_loss_last", "pairs": "reward/train_pairs", "champion": "reward/champion",
        "version": "reward/registered_version", "dtype": "reward/dtype",
    },
    "ppo": {
        "algorithm": "ppo/algorithm", "updates": _trained("updates"),
        "final": {"kl": _trained("final_kl"), "score": _trained("final_score")},
        "gold": {"start": _trained("gold_start"), "end": _trained("gold_end")}, "dtype": _trained("dtype"),
        "rm": "ppo/reward_model_version", "version": "ppo/registered_version",
    },
    "evaluate": {
        "gold": {"win": "eval/gold_win_rate_vs_reference", "lo": "eval/gold_win_rate_vs_reference_low",
                 "hi": "eval/gold_win_rate_vs_reference_high"},
        "proxy": {"win": "eval/proxy_win_rate_vs_reference"}, "kl": "eval/kl",
        "gates": {"passed": "eval/all_gates_passed", "failed": "eval/failed_gates"},
    },
    "promote": {
        "promoted": "promote/promoted", "version": "promote/version", "failed": "promote/failed_gates",
        "champion": "promote/champion", "previous": "promote/previous",
    },
}


def headline(stage: str, metrics: Mapping[str, object]) -> dict:
    """The headline figures of ``stage`` (:data:`HEADLINES`) from its flat metrics, less those it did not write."""

    def pick(table: Mapping) -> dict:
        out = {}
        for name, leaf in table.items():
            if isinstance(leaf, Mapping):
                if inner := pick(leaf):
                    out[name] = inner
                continue
            keys = (leaf,) if isinstance(leaf, str) else leaf
            value = next((metrics[k] for k in keys if metrics.get(k) is not None), None)
            if value is not None:
                out[name] = value
        return out

    return pick(HEADLINES[stage])


@dataclass(frozen=True)
class MetricsFolder:
    """``paths.metrics`` (kept in git): per stage its headline figures (the DVC metrics) and its full metrics.

    Code reads a stage's full metrics (:meth:`read`); ``metrics/<stage>.json``
    is only for people, through ``dvc metrics show`` and ``dvc exp show``.
    """

    folder: Path

    def headline(self, stage: str) -> Path:
        """``<stage>.json``: the figures of :data:`HEADLINES`, nested by topic (dvc.yaml ``metrics:``)."""
        return self.folder / f"{stage}.json"

    def detail(self, stage: str) -> Path:
        """``<stage>.detail.json``: every figure, flat ``prefix/name`` as logged to MLflow (an uncached dvc.yaml out)."""
        return self.folder / f"{stage}.detail.json"

    def write(self, stage: str, metrics: Mapping[str, object]) -> None:
        """Both files of a stage from its flat metrics, each replaced in one rename."""
        _atomic_text(self.detail(stage), json.dumps(dict(metrics), indent=2, sort_keys=True, default=str))
        _atomic_text(self.headline(stage), json.dumps(headline(stage, metrics), indent=2, default=str))

    def read(self, stage: str) -> dict:
        """A stage's full metrics ({} when it has not run)."""
        path = self.detail(stage)
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_text())
        except ValueError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None


#: evaluate's figures in ``paths.plots``
EVALUATION_PLOTS = {"reward_vs_kl": "gold_vs_kl.png", "ppo": "ppo_curves.png", "lengths": "lengths.png"}


@dataclass(frozen=True)
class Layout:
    """Every artifact of a run, from the ``paths:`` section of params.yaml."""

    paths: object  # rlhf_core.config.PathsConfig (not imported: config is the caller's dependency, not this module's)

    def _path(self, key: str) -> Path:
        return Path(getattr(self.paths, key))

    @property
    def prompt_source(self) -> Path:
        return self._path("prompt_source")

    @property
    def base_model(self) -> ModelFolder:
        return ModelFolder(self._path("base_model"), "base_model")

    @property
    def prompts(self) -> PromptSplit:
        return PromptSplit(self._path("prompts"))

    @property
    def candidates(self) -> BundleFolder:
        return BundleFolder(self._path("candidates"))

    @property
    def label_export(self) -> BundleFolder:
        return BundleFolder(self._path("label_export"))

    @property
    def preference_import(self) -> Path:
        return self._path("preference_import")

    @property
    def preferences(self) -> PreferenceFolder:
        return PreferenceFolder(self._path("preferences"))

    @property
    def demonstrations(self) -> Path:
        """The shipped hand-written demonstrations (``sft.source: written``)."""
        return self._path("demonstrations")

    @property
    def label_demonstrations(self) -> Path:
        """The labelling app's demonstration export (``sft.source: labels``)."""
        return self._path("label_export") / LABEL_DEMONSTRATIONS_FILE

    @property
    def sft_model(self) -> SFTFolder:
        return SFTFolder(self._path("sft_model"), "sft")

    @property
    def starting_policy(self) -> ModelFolder:
        """The policy the later stages start from: the SFT model when the sft stage trained one, else the base model.

        generate_candidates samples it (``candidates.policy: base``), PPO starts
        from it and keeps it as its frozen reference (the KL penalty is measured
        against it, as in InstructGPT), train_reward sets reward zero on its
        completions and evaluate compares the candidate with it.  The sft stage
        always writes ``paths.sft_model``, so DVC reruns all of them when it changes.
        """
        sft = self.sft_model
        return sft if sft.exists() else self.base_model

    @property
    def reward_model(self) -> ModelFolder:
        return ModelFolder(self._path("reward_model"), "train_reward")

    @property
    def reward_release(self) -> Path:
        """Which registered reward model the folder is (:class:`rlhf_core.reward.release.RewardRelease`)."""
        return self._path("reward_release")

    @property
    def reward_loss(self) -> CsvCurve:
        return CsvCurve(self._path("plots") / "reward_loss.csv")

    @property
    def policy(self) -> ModelFolder:
        return ModelFolder(self._path("policy"), "ppo")

    @property
    def ppo_curve(self) -> CsvCurve:
        return CsvCurve(self._path("plots") / "ppo_curve.csv")

    @property
    def ppo_gold_probe(self) -> CsvCurve:
        """The curve's gold probes per prompt (``update``, ``prompt``, ``gold``, ``gold_proxy``): paired tests."""
        return CsvCurve(self._path("plots") / "ppo_gold_probe.csv")

    @property
    def evaluation(self) -> EvaluationFolder:
        return EvaluationFolder(self._path("evaluation"))

    def evaluation_plot(self, name: str) -> Path:
        return self._path("plots") / EVALUATION_PLOTS[name]

    @property
    def metrics(self) -> MetricsFolder:
        return MetricsFolder(self._path("metrics"))


@dataclass(frozen=True)
class StageIO:
    """What a stage reads and writes, as :class:`Layout` attribute names (``dvc.yaml`` must agree)."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    plots: tuple[str, ...] = ()
    #: the stages whose full metrics (:meth:`MetricsFolder.read`) this stage reads
    metrics_inputs: tuple[str, ...] = ()


STAGE_IO: dict[str, StageIO] = {
    "base_model": StageIO(inputs=(), outputs=("base_model",)),
    "prompts": StageIO(inputs=("prompt_source", "base_model"), outputs=("prompts",)),
    "sft": StageIO(
        inputs=("prompts", "base_model", "demonstrations", "label_export", "preference_import"), outputs=("sft_model",)
    ),
    "generate_candidates": StageIO(inputs=("prompts", "base_model", "sft_model"), outputs=("candidates",)),
    "collect_preferences": StageIO(inputs=("candidates", "label_export", "preference_import"), outputs=("preferences",)),
    "train_reward": StageIO(
        inputs=("preferences", "candidates", "prompts", "base_model", "sft_model"),
        outputs=("reward_model", "reward_release"),
        plots=("reward_loss",), metrics_inputs=("collect_preferences",),
    ),
    # ppo and evaluate hash the preference pairs into the lineage they record
    "ppo": StageIO(
        inputs=("prompts", "base_model", "sft_model", "reward_model", "reward_release", "preferences"),
        outputs=("policy",),
        plots=("ppo_curve", "ppo_gold_probe"),
    ),
    "evaluate": StageIO(
        inputs=("prompts", "base_model", "sft_model", "reward_model", "reward_release", "policy", "ppo_curve",
                "ppo_gold_probe", "label_export", "preferences"),
        outputs=("evaluation",),
        plots=tuple(f"evaluation_plot:{name}" for name in EVALUATION_PLOTS), metrics_inputs=("ppo",),
    ),
    "promote": StageIO(inputs=("evaluation",), outputs=()),
}


def artifact_path(layout: Layout, name: str) -> Path:
    """The file or folder of artifact ``name`` of :data:`STAGE_IO` (``evaluation_plot:<figure>`` for evaluate's PNGs)."""
    if name.startswith("evaluation_plot:"):
        return layout.evaluation_plot(name.partition(":")[2])
    value = getattr(layout, name)
    return value if isinstance(value, Path) else getattr(value, "folder", None) or value.path
