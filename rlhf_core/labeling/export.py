"""``rlhf label export``: everything the app collected, in one folder swapped into place atomically.

- the rankings as a preference bundle (prompts, completions, rankings);
- the demonstrations in TRL's two SFT forms: ``demonstrations.jsonl``
  (prompt-completion: ``prompt`` and ``completion`` as text) and
  ``demonstrations_messages.jsonl`` (conversational: ``messages`` with a user
  and an assistant turn), each row also naming its annotator, draft and time;
- the ratings as ``ratings.jsonl``, one row per (annotator, item) in the
  columns the ``ratings`` importer reads (``prompt``, ``completions`` with
  ``response`` and ``overall_score``, ``annotator_id``), so that
  ``rlhf preferences import --format ratings`` (or ``labeling.backend: import``) turns them into rankings
  with ratings for the reward model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rlhf_core.artifacts import LABEL_DEMONSTRATIONS_FILE as DEMONSTRATIONS_FILE
from rlhf_core.labeling.store import DemonstrationRow, LabelStore, RatingRow
from rlhf_core.preferences import BUNDLE_FILES, PreferenceBundle

DEMONSTRATION_MESSAGES_FILE = "demonstrations_messages.jsonl"
RATINGS_FILE = "ratings.jsonl"
EXPORT_FILES = frozenset({*BUNDLE_FILES.values(), DEMONSTRATIONS_FILE, DEMONSTRATION_MESSAGES_FILE, RATINGS_FILE})


@dataclass(frozen=True)
class ExportSummary:
    prompts: int
    completions: int
    rankings: int
    skipped: int
    demonstrations: int = 0
    ratings: int = 0


def snapshot(store: LabelStore) -> tuple[PreferenceBundle, int]:
    """The bundle of every human ranking with the prompts and completions it refers to, and the number of skips.

    Labels are read before items, and items are never deleted, so every
    ranking's prompt and completions are in the bundle even while annotators
    keep labelling.
    """
    rows = store.labels()
    bundle = PreferenceBundle(rankings=[row.ranking for row in rows if row.ranking is not None])
    seen_prompts, seen_completions = set(), set()
    for prompt, completions in store.labelled_items():
        if prompt.id not in seen_prompts:
            seen_prompts.add(prompt.id)
            bundle.prompts.append(prompt)
        for completion in completions:
            if completion.id not in seen_completions:
                seen_completions.add(completion.id)
                bundle.completions.append(completion)
    return bundle, sum(row.skipped for row in rows)


def export_labels(store: LabelStore, out: str | Path) -> ExportSummary:
    """Write the snapshot to ``out`` so that readers see either the old folder or the new one, never a mix.

    The bundle is written to a sibling folder and swapped in with renames;
    files that are not part of a bundle (a README) are carried over.
    """
    out = Path(out)
    bundle, skipped = snapshot(store)
    demonstrations = store.demonstrations()
    ratings = store.ratings()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new-"))
    staging.chmod(0o755)  # mkdtemp makes it private; the exported folder is shared data
    try:
        bundle.write(staging)
        if demonstrations:
            _write_jsonl(staging / DEMONSTRATIONS_FILE, map(demonstration_row, demonstrations))
            _write_jsonl(staging / DEMONSTRATION_MESSAGES_FILE, map(demonstration_messages_row, demonstrations))
        if ratings:
            _write_jsonl(staging / RATINGS_FILE, map(rating_row, ratings))
        if out.exists():
            for extra in out.iterdir():
                if extra.name not in EXPORT_FILES and extra.is_file():
                    shutil.copy2(extra, staging / extra.name)
        _swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary = (len(bundle.prompts), len(bundle.completions), len(bundle.rankings), skipped)
    return ExportSummary(*summary, demonstrations=len(demonstrations), ratings=len(ratings))


def _provenance(row: DemonstrationRow) -> dict:
    return {
        "id": f"demo-{row.label_id}",
        "prompt_id": row.prompt.id,
        "annotator_id": row.annotator,
        "draft_id": row.draft.id if row.draft else None,
        "draft_policy_version": row.draft.policy_version if row.draft else None,
        "created_at": row.created_at.isoformat(),
        "source": "human",
    }


def demonstration_row(row: DemonstrationRow) -> dict:
    """TRL's standard prompt-completion form (SFT trains on the completion)."""
    return {"prompt": row.prompt.text, "completion": row.text, **_provenance(row)}


def demonstration_messages_row(row: DemonstrationRow) -> dict:
    """TRL's conversational form: one user turn, one assistant turn (the chat template is applied at training)."""
    messages = [{"role": "user", "content": row.prompt.text}, {"role": "assistant", "content": row.text}]
    return {"messages": messages, **_provenance(row)}


def rating_row(row: RatingRow) -> dict:
    completions = [
        {
            "id": c.id,
            "response": c.text,
            "overall_score": row.scores[c.id],
            "comment": row.comments.get(c.id),
            "flag": row.flags.get(c.id),
        }
        for c in row.completions
    ]
    return {
        "id": f"rating-{row.label_id}",
        "prompt_id": row.prompt.id,
        "prompt": row.prompt.text,
        "completions": completions,
        "annotator_id": row.annotator,
        "created_at": row.created_at.isoformat(),
    }


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    # Written inside the staging folder, which is swapped in whole: no reader sees a half-written file.
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _swap_in(staging: Path, out: Path) -> None:
    if not out.exists():
        staging.rename(out)
        return
    retired = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    retired.rmdir()
    out.rename(retired)
    staging.rename(out)
    shutil.rmtree(retired)
