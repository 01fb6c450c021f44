"""Human evaluation for teams without a gold function: a blind side-by-side task and its win rates.

The evaluate stage writes, per eval prompt, one labelling item holding the
candidate's response and the other policies' responses (reference, champion)
as a preference bundle (``task/``: prompts.jsonl + completions.jsonl) that
``rlhf label load`` accepts.  The task is blind: completion ids are salted
hashes that do not reveal the policy, every completion says
``policy_version: "blind"``, the order within an item is shuffled, and the
id -> policy mapping lives only in ``key.json`` beside the task folder.

Annotators rank the responses in the labelling app; ``rlhf label export``
writes their rankings to ``paths.label_export``; the next evaluation reads the
rankings that refer to the key's ids and turns them into win rates of the
candidate against each other policy (a tie counts half).  Prompts carry
``source: "human_eval"`` so that the preference stage can keep these labels
out of reward-model training.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rlhf_core.errors import DataError
from rlhf_core.evaluation.metrics import WinRate
from rlhf_core.preferences import PreferenceBundle
from rlhf_core.records import write_json
from rlhf_core.schemas import Completion, Prompt, Ranking

SOURCE = "human_eval"
BLIND_VERSION = "blind"
TASK_DIR = "task"
KEY_FILE = "key.json"
CANDIDATE = "candidate"


@dataclass(frozen=True)
class BlindTask:
    bundle: PreferenceBundle
    key: dict[str, str]  # completion id -> policy name


def blind_id(salt: str, policy: str, prompt_id: str) -> str:
    """A completion id that reveals nothing without the salt."""
    return "he-" + hashlib.sha256(f"{salt}\0{policy}\0{prompt_id}".encode()).hexdigest()[:16]


def blind_task(prompts: Sequence[Prompt], responses: Mapping[str, Sequence[str]], *, salt: str, seed: int) -> BlindTask:
    """One item per prompt with every policy's response (``responses``: policy name -> text per prompt), shuffled."""
    if CANDIDATE not in responses or len(responses) < 2:
        raise ValueError("a blind comparison needs the candidate and at least one other policy")
    rng = random.Random(seed)
    bundle, key = PreferenceBundle(), {}
    for index, prompt in enumerate(prompts):
        bundle.prompts.append(Prompt(id=prompt.id, text=prompt.text, source=SOURCE, category=prompt.category))
        entries = [(policy, texts[index]) for policy, texts in responses.items()]
        rng.shuffle(entries)
        for policy, text in entries:
            completion_id = blind_id(salt, policy, prompt.id)
            bundle.completions.append(
                Completion(id=completion_id, prompt_id=prompt.id, text=text, policy_version=BLIND_VERSION)
            )
            key[completion_id] = policy
    return BlindTask(bundle, key)


def write_task(task: BlindTask, folder: str | Path) -> Path:
    """Write ``folder/task/`` (what annotators see) and ``folder/key.json`` (what they must not); returns the task folder."""
    folder = Path(folder)
    task.bundle.write(folder / TASK_DIR)
    write_json(folder / KEY_FILE, {"completions": task.key})
    return folder / TASK_DIR


def read_key(folder: str | Path) -> dict[str, str]:
    path = Path(folder) / KEY_FILE
    try:
        return dict(json.loads(path.read_text())["completions"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a human-evaluation key ({exc})") from None


def human_win_rates(rankings: Sequence[Ranking], key: Mapping[str, str]) -> dict[str, WinRate]:
    """Win rate of the candidate against every other policy of the key, one comparison per ranking and opponent.

    Rankings of other items (training labels in the same export) are ignored.
    """
    tallies: dict[str, list[int]] = {}
    for ranking in rankings:
        rank = {cid: r for cid, r in ranking.rank_of().items() if cid in key}
        mine = [r for cid, r in rank.items() if key[cid] == CANDIDATE]
        if not mine:
            continue
        for cid, theirs in rank.items():
            opponent = key[cid]
            if opponent == CANDIDATE:
                continue
            tally = tallies.setdefault(opponent, [0, 0, 0])
            tally[0 if mine[0] < theirs else 1 if mine[0] == theirs else 2] += 1
    return {opponent: WinRate(*tally) for opponent, tally in tallies.items()}
