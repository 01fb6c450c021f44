"""``rlhf label export``: the app's rankings as a preference bundle, swapped into place atomically."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rlhf_core.labeling.store import LabelStore
from rlhf_core.preferences import BUNDLE_FILES, PreferenceBundle


@dataclass(frozen=True)
class ExportSummary:
    prompts: int
    completions: int
    rankings: int
    skipped: int


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
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new-"))
    staging.chmod(0o755)  # mkdtemp makes it private; the exported folder is shared data
    try:
        bundle.write(staging)
        if out.exists():
            for extra in out.iterdir():
                if extra.name not in BUNDLE_FILES.values() and extra.is_file():
                    shutil.copy2(extra, staging / extra.name)
        _swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportSummary(len(bundle.prompts), len(bundle.completions), len(bundle.rankings), skipped)


def _swap_in(staging: Path, out: Path) -> None:
    if not out.exists():
        staging.rename(out)
        return
    retired = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    retired.rmdir()
    out.rename(retired)
    staging.rename(out)
    shutil.rmtree(retired)
