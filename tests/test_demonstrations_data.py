"""The shipped demonstrations (data/demonstrations.jsonl) against the shipped prompts and their split.

The prompts are read the way the prompts stage reads them (``import_prompts`` with
params.yaml's ``prompts`` section) and split with ``in_eval_split``, so a change to
the prompt file, its ids or the split seed that would leak an eval prompt into SFT
fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from rlhf_core.base_model import TOKENIZER_ASSET
from rlhf_core.config import load_params
from rlhf_core.prompts import import_prompts, in_eval_split

REPO = Path(__file__).resolve().parents[1]
DEMONSTRATIONS = REPO / "data" / "demonstrations.jsonl"
MIN_PROMPTS = 300
#: Sampling stops at 32 new tokens; a little slack for the longest (poems), none for rambling.
MAX_TOKENS = 40
#: Same rule as the gold rubric's complete ending: . ! or ? possibly followed by closing quotes/brackets.
COMPLETE_ENDING = re.compile(r"(?<!\.\.)[.!?][\"'”’)\]]*$")
FIELDS = {"prompt_id", "prompt", "completion", "source"}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(TOKENIZER_ASSET))


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """id -> text of the prompts the prompts stage keeps, and the params section that split them."""
    params = load_params(REPO / "params.yaml")
    section = params.prompts
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    kept = import_prompts(REPO / params.paths.prompt_source, section.format, section.text_field, count, section.max_tokens)
    return {p.id: p.text for p in kept.prompts}, section


@pytest.fixture(scope="module")
def rows():
    out = []
    for number, line in enumerate(DEMONSTRATIONS.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            pytest.fail(f"{DEMONSTRATIONS.name}:{number}: not JSON ({exc})")
        assert isinstance(row, dict) and set(row) == FIELDS, f"line {number}: fields {sorted(row)}"
        assert all(isinstance(row[key], str) and row[key].strip() for key in FIELDS), f"line {number}: empty field"
        out.append(row)
    return out


def test_each_row_matches_a_kept_prompt_verbatim(rows, prompts):
    texts, _ = prompts
    for row in rows:
        assert row["prompt_id"] in texts, f"{row['prompt_id']}: not a prompt the prompts stage keeps"
        assert row["prompt"] == texts[row["prompt_id"]], f"{row['prompt_id']}: prompt text differs from data/prompts.jsonl"
        assert row["source"] == "written"


def test_no_eval_prompt_and_enough_distinct_training_prompts(rows, prompts):
    _, section = prompts
    leaked = [r["prompt_id"] for r in rows if in_eval_split(r["prompt_id"], section.eval_fraction, section.seed)]
    assert not leaked, f"eval-split prompts have demonstrations: {leaked}"
    ids = [r["prompt_id"] for r in rows]
    assert len(set(ids)) == len(ids), "a prompt has more than one demonstration"
    assert len(ids) >= MIN_PROMPTS


def test_completions_are_distinct_complete_and_short(rows, tokenizer):
    completions = [r["completion"] for r in rows]
    assert len({" ".join(c.lower().split()) for c in completions}) == len(completions), "duplicate completions"
    for row in rows:
        text = row["completion"]
        assert text == text.strip(), f"{row['prompt_id']}: surrounding whitespace"
        assert COMPLETE_ENDING.search(text), f"{row['prompt_id']}: does not end in a complete sentence"
        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        assert tokens <= MAX_TOKENS, f"{row['prompt_id']}: {tokens} tokens > {MAX_TOKENS}"
        assert "<|" not in text, f"{row['prompt_id']}: chat markup"
