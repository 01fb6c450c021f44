"""Bundles out to TRL's preference format: a JSONL/Parquet file or a ``datasets`` folder.

Rows have TRL's explicit-prompt columns ``prompt``, ``chosen`` and ``rejected``:
one row per comparison a ranking implies (tied completions give none).  TRL's
``RewardTrainer`` tokenizes ``prompt + chosen``, so a completion starts with a
space, as in TRL's own standard-format examples; importing strips it again.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from rlhf_core.errors import DataError
from rlhf_core.preferences import PreferenceBundle, ranking_to_pairs

COLUMNS = ("prompt", "chosen", "rejected")


def preference_rows(bundle: PreferenceBundle) -> list[dict[str, str]]:
    """One TRL row per pair of every ranking of the bundle, in ranking order."""
    prompts = {prompt.id: prompt for prompt in bundle.prompts}
    completions = {completion.id: completion for completion in bundle.completions}
    rows = []
    for ranking in bundle.rankings:
        if ranking.prompt_id not in prompts:
            raise DataError(f"ranking {ranking.id} names prompt {ranking.prompt_id}, which the bundle lacks")
        missing = [cid for cid in ranking.completion_ids if cid not in completions]
        if missing:
            raise DataError(f"ranking {ranking.id} names completions the bundle lacks: {', '.join(missing)}")
        for pair in ranking_to_pairs(ranking, prompts[ranking.prompt_id], completions):
            rows.append({"prompt": pair.prompt, "chosen": " " + pair.chosen, "rejected": " " + pair.rejected})
    if not rows:
        raise DataError("the bundle holds no preference pairs to export (no rankings, or only ties)")
    return rows


def export_trl(bundle: PreferenceBundle, path: str | Path) -> int:
    """Write the bundle's pairs as TRL preference rows: ``.parquet``, ``.jsonl`` or ``.jsonl.gz``; returns the count."""
    path = Path(path)
    rows = preference_rows(bundle)
    name = path.name.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([(c, pa.string()) for c in COLUMNS])), path)
    elif name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "wt", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    else:
        raise DataError(f"{path}: cannot tell the output format; name it .jsonl, .jsonl.gz or .parquet")
    return len(rows)


def export_hf(bundle: PreferenceBundle, folder: str | Path) -> int:
    """Save the bundle's pairs as a ``datasets`` folder (``load_from_disk``) ready for TRL's RewardTrainer."""
    from datasets import Dataset, Features, Value

    rows = preference_rows(bundle)
    features = Features({column: Value("string") for column in COLUMNS})
    Dataset.from_list(rows, features=features).save_to_disk(str(folder))
    return len(rows)
