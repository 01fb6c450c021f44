"""The labelling app's SQLite store: items, annotators, assignments, labels and sign-in sessions.

An item is one task of a kind (:data:`TASKS`): rank a prompt's completions,
rate each of them on a 1-7 scale, or write a demonstration (the ideal answer,
optionally starting from a model draft).  All kinds share the assignments,
the queues and the labels table; a label holds the columns of its kind.

Durability and concurrency come from SQLite itself: WAL mode lets readers run
beside the one writer, ``busy_timeout`` makes a writer wait for the lock
instead of failing, every write is one short ``BEGIN IMMEDIATE`` transaction,
and ``synchronous=FULL`` fsyncs the log at each commit, so a label whose
request returned survives a killed server (and a power cut).  A label is
unique per assignment, and an assignment unique per (item, annotator), so
nothing can be stored twice.

Tokens and session ids are 256-bit random strings stored only as SHA-256
hashes: with that much entropy a slow password hash would add nothing.
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from rlhf_core.errors import RLHFError
from rlhf_core.labeling.items import Item
from rlhf_core.schemas import Completion, Prompt, Ranking

#: How long a writer waits for the database lock before giving up; far above any real write (milliseconds).
BUSY_TIMEOUT_MS = 15_000

FLAGS = ("unsafe", "nonsense")

TASKS = ("ranking", "rating", "demonstration")

#: The rating task's Likert scale, as in InstructGPT's per-output 1-7 scores: fixed by the task, not tuned.
LIKERT = (1, 7)

#: Row ids are positive signed 64-bit integers; binding a larger Python int to a query raises OverflowError.
MAX_ROW_ID = 2**63 - 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    item_key TEXT NOT NULL UNIQUE,
    prompt_id TEXT NOT NULL,
    prompt_json TEXT NOT NULL,
    completions_json TEXT NOT NULL,
    gold_json TEXT,
    loaded_at TEXT NOT NULL,
    task TEXT NOT NULL DEFAULT 'ranking'
);
CREATE TABLE IF NOT EXISTS annotators (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_sha256 TEXT NOT NULL UNIQUE,
    is_admin INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    id INTEGER PRIMARY KEY,
    item_id INTEGER NOT NULL REFERENCES items(id),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    sort_key REAL NOT NULL,
    assigned_at TEXT NOT NULL,
    UNIQUE (item_id, annotator_id)
);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY,
    assignment_id INTEGER NOT NULL UNIQUE REFERENCES assignments(id),
    skipped INTEGER NOT NULL,
    completion_ids_json TEXT,
    ranks_json TEXT,
    flags_json TEXT NOT NULL,
    created_at TEXT NOT NULL,
    text TEXT,
    scores_json TEXT,
    comments_json TEXT
);
CREATE TABLE IF NOT EXISTS sessions (
    id_sha256 TEXT PRIMARY KEY,
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    expires_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS assignments_by_annotator ON assignments (annotator_id, sort_key);
"""

#: Columns added after the first release: a store created before them gets them on open (ranking items and labels).
ADDED_COLUMNS = {
    "items": {"task": "TEXT NOT NULL DEFAULT 'ranking'"},
    "labels": {"text": "TEXT", "scores_json": "TEXT", "comments_json": "TEXT"},
}


class NotFound(RLHFError):
    """The assignment does not exist or belongs to another annotator (the two are not told apart)."""


class AlreadyLabelled(RLHFError):
    """The assignment already has a label; labels are never replaced or duplicated."""


class InvalidLabel(RLHFError):
    """A submitted ranking or flag set does not fit the item."""


@dataclass(frozen=True)
class Annotator:
    id: int
    name: str
    is_admin: bool


@dataclass(frozen=True)
class Assignment:
    """One item as one annotator sees it: completions in a per-assignment shuffled order.

    For a demonstration, ``completions`` holds the model draft (or nothing).
    """

    id: int
    prompt: Prompt
    completions: tuple[Completion, ...]
    labelled: bool
    task: str = "ranking"


@dataclass(frozen=True)
class AssignResult:
    new: int
    moved: int


@dataclass(frozen=True)
class Progress:
    done: int
    assigned: int
    by_task: dict[str, tuple[int, int]] = field(default_factory=dict)  # task -> (done, assigned), assigned tasks only


@dataclass(frozen=True)
class LabelRow:
    """A stored label with who made it and when (``ranking`` is None for a skip and for other tasks)."""

    annotator: str
    created_at: datetime
    skipped: bool
    flags: dict[str, str]
    ranking: Ranking | None
    task: str = "ranking"


@dataclass(frozen=True)
class DemonstrationRow:
    """A written answer: ``draft`` is the model draft the annotator was shown (None when the item had none)."""

    label_id: int
    annotator: str
    created_at: datetime
    prompt: Prompt
    draft: Completion | None
    text: str


@dataclass(frozen=True)
class RatingRow:
    """One annotator's scores of an item's completions (stored order), with optional comments and flags."""

    label_id: int
    item_id: int
    annotator: str
    created_at: datetime
    prompt: Prompt
    completions: tuple[Completion, ...]
    scores: dict[str, int]
    comments: dict[str, str]
    flags: dict[str, str]


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def ranks_from_groups(groups: list[list[str]]) -> tuple[list[str], list[int]]:
    """Best-to-worst tie groups -> (completion ids, competition ranks): [[a], [b, c], [d]] -> 1, 2, 2, 4."""
    ids, ranks = [], []
    for group in groups:
        rank = len(ids) + 1
        ids.extend(group)
        ranks.extend([rank] * len(group))
    return ids, ranks


class LabelStore:
    """All reads and writes of the labelling app; one short connection per call, so any thread may use it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            for table, columns in ADDED_COLUMNS.items():
                have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                for name, definition in columns.items():
                    if name not in have:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {definition}")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            yield db
        finally:
            db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction; IMMEDIATE takes the write lock up front so it never fails half way on a busy database."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # -- items and annotators -------------------------------------------------------------------------------------

    def add_items(self, items: list[Item]) -> int:
        """Store new items; items already loaded (same task, prompt and completion set) are left alone.

        Returns the new count.
        """
        loaded_at = now_utc().isoformat()
        with self._transaction() as db:
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO items (item_key, prompt_id, prompt_json, completions_json, gold_json, loaded_at,"
                " task) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        item.key,
                        item.prompt.id,
                        item.prompt.model_dump_json(),
                        json.dumps([c.model_dump(mode="json") for c in item.completions]),
                        item.gold.model_dump_json() if item.gold else None,
                        loaded_at,
                        item.task,
                    )
                    for item in items
                ],
            )
            return db.total_changes - before

    def add_annotator(self, name: str, *, admin: bool = False) -> str:
        """Create an annotator and return its sign-in token (shown once; only its hash is kept)."""
        name = name.strip()
        if not name or len(name) > 64:
            raise RLHFError("an annotator name must have 1 to 64 characters")
        token = secrets.token_urlsafe(32)
        try:
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO annotators (name, token_sha256, is_admin, created_at) VALUES (?, ?, ?, ?)",
                    (name, hash_secret(token), int(admin), now_utc().isoformat()),
                )
        except sqlite3.IntegrityError:
            raise RLHFError(f"annotator {name!r} already exists") from None
        return token

    def annotator_by_token(self, token: str) -> Annotator | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT id, name, is_admin FROM annotators WHERE token_sha256 = ?", (hash_secret(token),)
            ).fetchone()
        return Annotator(row[0], row[1], bool(row[2])) if row else None

    # -- sessions -------------------------------------------------------------------------------------------------

    def start_session(self, annotator: Annotator, hours: float) -> str:
        session_id = secrets.token_urlsafe(32)
        expires = now_utc() + timedelta(hours=hours)
        with self._transaction() as db:
            db.execute("DELETE FROM sessions WHERE expires_at < ?", (now_utc().isoformat(),))
            db.execute(
                "INSERT INTO sessions (id_sha256, annotator_id, expires_at) VALUES (?, ?, ?)",
                (hash_secret(session_id), annotator.id, expires.isoformat()),
            )
        return session_id

    def session_annotator(self, session_id: str) -> Annotator | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT a.id, a.name, a.is_admin FROM sessions s JOIN annotators a ON a.id = s.annotator_id"
                " WHERE s.id_sha256 = ? AND s.expires_at > ?",
                (hash_secret(session_id), now_utc().isoformat()),
            ).fetchone()
        return Annotator(row[0], row[1], bool(row[2])) if row else None

    def end_session(self, session_id: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM sessions WHERE id_sha256 = ?", (hash_secret(session_id),))

    # -- assignments ----------------------------------------------------------------------------------------------

    def assign(self, per_item: int, gold_fraction: float) -> AssignResult:
        """Give every item to ``per_item`` labelling (non-admin) annotators and mix in gold items.

        Items go to the annotators with the fewest assignments.  Then open
        (unlabelled) work moves from the busiest annotators to the idlest until
        their queues differ by at most one, so an annotator added after the
        items were loaded gets a fair share; only the tail of a queue moves,
        never the item an annotator has open.  Last, each annotator gets gold
        items until they make up ``gold_fraction`` of its assignments (as far as
        there are gold items it has not seen).  Labelled work never moves.
        """
        with self._transaction() as db:
            pool = [r[0] for r in db.execute("SELECT id FROM annotators WHERE is_admin = 0 ORDER BY id")]
            if not pool:
                return AssignResult(0, 0)
            items = db.execute("SELECT id, gold_json IS NOT NULL FROM items ORDER BY id").fetchall()
            holders: dict[int, set[int]] = {item_id: set() for item_id, _ in items}
            for item_id, annotator_id in db.execute("SELECT item_id, annotator_id FROM assignments"):
                holders[item_id].add(annotator_id)
            gold = {item_id for item_id, is_gold in items if is_gold}
            new = _top_up_regular(holders, gold, pool, per_item)
            assigned_at = now_utc().isoformat()
            db.executemany(
                "INSERT INTO assignments (item_id, annotator_id, sort_key, assigned_at) VALUES (?, ?, ?, ?)",
                [(item, annotator, _sort_key(item, annotator), assigned_at) for item, annotator in new],
            )
            open_work = db.execute(
                "SELECT a.id, a.item_id, a.annotator_id FROM assignments a LEFT JOIN labels l ON l.assignment_id = a.id"
                " JOIN annotators n ON n.id = a.annotator_id"
                " WHERE l.id IS NULL AND n.is_admin = 0 ORDER BY a.sort_key, a.id"
            ).fetchall()
            moves = _balance_open_work(open_work, holders, gold, pool)
            db.executemany(
                "UPDATE assignments SET annotator_id = ?, sort_key = ?, assigned_at = ? WHERE id = ?",
                [(annotator, _sort_key(item, annotator), assigned_at, assignment) for assignment, item, annotator in moves],
            )
            gold_new = _top_up_gold(holders, gold, pool, gold_fraction)
            db.executemany(
                "INSERT INTO assignments (item_id, annotator_id, sort_key, assigned_at) VALUES (?, ?, ?, ?)",
                [(item, annotator, _sort_key(item, annotator), assigned_at) for item, annotator in gold_new],
            )
            return AssignResult(len(new) + len(gold_new), len(moves))

    def progress(self, annotator: Annotator) -> Progress:
        with self._connect() as db:
            rows = db.execute(
                "SELECT i.task, COUNT(l.id), COUNT(a.id) FROM assignments a JOIN items i ON i.id = a.item_id"
                " LEFT JOIN labels l ON l.assignment_id = a.id WHERE a.annotator_id = ? GROUP BY i.task",
                (annotator.id,),
            ).fetchall()
        by_task = {task: (done, assigned) for task, done, assigned in sorted(rows, key=lambda r: TASKS.index(r[0]))}
        return Progress(sum(d for d, _ in by_task.values()), sum(a for _, a in by_task.values()), by_task)

    def next_assignment(self, annotator: Annotator) -> Assignment | None:
        """The annotator's next unlabelled assignment, in its shuffled order (gold items mixed in)."""
        with self._connect() as db:
            row = db.execute(
                "SELECT a.id FROM assignments a LEFT JOIN labels l ON l.assignment_id = a.id"
                " WHERE a.annotator_id = ? AND l.id IS NULL ORDER BY a.sort_key, a.id LIMIT 1",
                (annotator.id,),
            ).fetchone()
        return self.assignment(annotator, row[0]) if row else None

    def assignment(self, annotator: Annotator, assignment_id: int) -> Assignment:
        """One of the annotator's own assignments; another annotator's is :class:`NotFound`."""
        _check_assignment_id(annotator, assignment_id)
        with self._connect() as db:
            row = db.execute(
                "SELECT i.prompt_json, i.completions_json, l.id IS NOT NULL, i.task FROM assignments a"
                " JOIN items i ON i.id = a.item_id LEFT JOIN labels l ON l.assignment_id = a.id"
                " WHERE a.id = ? AND a.annotator_id = ?",
                (assignment_id, annotator.id),
            ).fetchone()
        if row is None:
            raise NotFound(f"no assignment {assignment_id} for {annotator.name}")
        completions = [Completion.model_validate(c) for c in json.loads(row[1])]
        # Shown in an order of its own per assignment, so that position bias does not line up across annotators.
        random.Random(assignment_id).shuffle(completions)
        return Assignment(assignment_id, Prompt.model_validate_json(row[0]), tuple(completions), bool(row[2]), row[3])

    # -- labels ---------------------------------------------------------------------------------------------------

    def save_label(
        self, annotator: Annotator, assignment_id: int, groups: list[list[str]] | None, flags: dict[str, str]
    ) -> None:
        """Store a ranking (best-to-worst tie groups) or, with ``groups=None``, a skip (of any task); one transaction."""
        with self._transaction() as db:
            task, known = self._owned_item(db, annotator, assignment_id)
            _check_flags(flags, known)
            if groups is None:
                _insert_label(db, assignment_id, skipped=1, flags=flags)
                return
            _check_task(task, "ranking")
            ids, ranks = _check_groups(groups, known)
            _insert_label(
                db, assignment_id, flags=flags, completion_ids_json=json.dumps(ids), ranks_json=json.dumps(ranks)
            )

    def save_rating(
        self,
        annotator: Annotator,
        assignment_id: int,
        scores: dict[str, int],
        comments: dict[str, str],
        flags: dict[str, str],
        max_chars: int,
    ) -> None:
        """Store a 1-7 score for every completion of a rating item, optional comments (blank ones dropped) and flags."""
        with self._transaction() as db:
            task, known = self._owned_item(db, annotator, assignment_id)
            _check_task(task, "rating")
            _check_flags(flags, known)
            _check_scores(scores, known)
            kept = _check_comments(comments, known, max_chars)
            _insert_label(
                db, assignment_id, flags=flags,
                scores_json=json.dumps(scores, sort_keys=True), comments_json=json.dumps(kept, sort_keys=True),
            )

    def save_demonstration(self, annotator: Annotator, assignment_id: int, text: str, max_chars: int) -> None:
        """Store the answer an annotator wrote (kept as written; only a blank or over-long one is refused)."""
        with self._transaction() as db:
            task, _ = self._owned_item(db, annotator, assignment_id)
            _check_task(task, "demonstration")
            if not text.strip():
                raise InvalidLabel("the demonstration is empty")
            if len(text) > max_chars:
                raise InvalidLabel(f"the demonstration has {len(text)} characters, over labeling.max_text_chars={max_chars}")
            _insert_label(db, assignment_id, flags={}, text=text)

    def _owned_item(self, db: sqlite3.Connection, annotator: Annotator, assignment_id: int) -> tuple[str, set[str]]:
        """(task, completion ids) of the item behind one of the annotator's own assignments."""
        _check_assignment_id(annotator, assignment_id)
        row = db.execute(
            "SELECT i.task, i.completions_json FROM assignments a JOIN items i ON i.id = a.item_id"
            " WHERE a.id = ? AND a.annotator_id = ?",
            (assignment_id, annotator.id),
        ).fetchone()
        if row is None:
            raise NotFound(f"no assignment {assignment_id} for {annotator.name}")
        return row[0], {c["id"] for c in json.loads(row[1])}

    def labels(self) -> list[LabelRow]:
        """Every stored label (all tasks, skips included), oldest first, as rows the export and statistics read."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT l.id, n.name, l.created_at, l.skipped, l.flags_json, l.completion_ids_json, l.ranks_json,"
                " i.prompt_id, i.task FROM labels l JOIN assignments a ON a.id = l.assignment_id"
                " JOIN annotators n ON n.id = a.annotator_id JOIN items i ON i.id = a.item_id ORDER BY l.id"
            ).fetchall()
        return [_label_row(*row) for row in rows]

    def demonstrations(self) -> list[DemonstrationRow]:
        """Every written demonstration (skips left out), oldest first."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT l.id, n.name, l.created_at, i.prompt_json, i.completions_json, l.text FROM labels l"
                " JOIN assignments a ON a.id = l.assignment_id JOIN annotators n ON n.id = a.annotator_id"
                " JOIN items i ON i.id = a.item_id WHERE i.task = 'demonstration' AND l.skipped = 0 ORDER BY l.id"
            ).fetchall()
        out = []
        for label_id, name, created_at, prompt_json, drafts_json, text in rows:
            drafts = [Completion.model_validate(c) for c in json.loads(drafts_json)]
            out.append(DemonstrationRow(
                label_id, name, datetime.fromisoformat(created_at), Prompt.model_validate_json(prompt_json),
                drafts[0] if drafts else None, text,
            ))
        return out

    def ratings(self) -> list[RatingRow]:
        """Every stored rating (skips left out), oldest first."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT l.id, i.id, n.name, l.created_at, i.prompt_json, i.completions_json, l.scores_json,"
                " l.comments_json, l.flags_json FROM labels l JOIN assignments a ON a.id = l.assignment_id"
                " JOIN annotators n ON n.id = a.annotator_id JOIN items i ON i.id = a.item_id"
                " WHERE i.task = 'rating' AND l.skipped = 0 ORDER BY l.id"
            ).fetchall()
        return [
            RatingRow(
                label_id, item_id, name, datetime.fromisoformat(created_at), Prompt.model_validate_json(prompt_json),
                tuple(Completion.model_validate(c) for c in json.loads(completions_json)),
                json.loads(scores_json), json.loads(comments_json), json.loads(flags_json),
            )
            for label_id, item_id, name, created_at, prompt_json, completions_json, scores_json, comments_json, flags_json
            in rows
        ]

    def gold_rankings(self) -> dict[str, Ranking]:
        with self._connect() as db:
            rows = db.execute("SELECT prompt_id, gold_json FROM items WHERE gold_json IS NOT NULL").fetchall()
        return {prompt_id: Ranking.model_validate_json(gold) for prompt_id, gold in rows}

    def labelled_items(self) -> list[tuple[Prompt, list[Completion]]]:
        """Prompt and completions of every ranking item that has at least one ranking (not only skips)."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT i.prompt_json, i.completions_json FROM items i WHERE i.task = 'ranking' AND EXISTS"
                " (SELECT 1 FROM assignments a JOIN labels l ON l.assignment_id = a.id"
                " WHERE a.item_id = i.id AND l.skipped = 0) ORDER BY i.id"
            ).fetchall()
        return [
            (Prompt.model_validate_json(p), [Completion.model_validate(c) for c in json.loads(cs)]) for p, cs in rows
        ]

    def assignment_counts(self) -> dict[str, int]:
        """Annotator name -> number of assignments."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT n.name, COUNT(a.id) FROM annotators n LEFT JOIN assignments a ON a.annotator_id = n.id"
                " WHERE n.is_admin = 0 GROUP BY n.id"
            ).fetchall()
        return dict(rows)

    def item_counts(self) -> tuple[int, int]:
        """(items, of which gold)."""
        with self._connect() as db:
            return db.execute("SELECT COUNT(*), COUNT(gold_json) FROM items").fetchone()

    def items_by_task(self) -> dict[str, int]:
        """Task -> number of items, for the tasks that have any."""
        with self._connect() as db:
            return dict(db.execute("SELECT task, COUNT(*) FROM items GROUP BY task").fetchall())


def _top_up_regular(holders: dict[int, set[int]], gold: set[int], pool: list[int], per_item: int) -> list[tuple[int, int]]:
    load = {annotator: 0 for annotator in pool}
    for item, annotators in holders.items():
        if item not in gold:
            for annotator in annotators & load.keys():
                load[annotator] += 1
    new = []
    for item, annotators in holders.items():
        if item in gold:
            continue
        free = sorted((a for a in pool if a not in annotators), key=lambda a: (load[a], a))
        for annotator in free[: max(0, per_item - len(annotators))]:
            annotators.add(annotator)
            load[annotator] += 1
            new.append((item, annotator))
    return new


def _balance_open_work(
    open_work: list[tuple[int, int, int]], holders: dict[int, set[int]], gold: set[int], pool: list[int]
) -> list[tuple[int, int, int]]:
    """Moves (assignment, item, new annotator) that even out the annotators' queues of open regular items."""
    queues: dict[int, list[tuple[int, int]]] = {annotator: [] for annotator in pool}
    for assignment, item, annotator in open_work:
        if item not in gold:
            queues[annotator].append((assignment, item))
    moves = []
    while True:
        busiest = max(pool, key=lambda a: (len(queues[a]), -a))
        idlest = min(pool, key=lambda a: (len(queues[a]), a))
        if len(queues[busiest]) - len(queues[idlest]) <= 1:
            return moves
        # The tail of the queue: the head is the item its annotator may have open right now.
        movable = [entry for entry in queues[busiest][1:] if idlest not in holders[entry[1]]]
        if not movable:
            return moves
        assignment, item = movable[-1]
        queues[busiest].remove((assignment, item))
        queues[idlest].append((assignment, item))
        holders[item] -= {busiest}
        holders[item].add(idlest)
        moves.append((assignment, item, idlest))


def _top_up_gold(holders: dict[int, set[int]], gold: set[int], pool: list[int], fraction: float) -> list[tuple[int, int]]:
    if not gold or fraction <= 0:
        return []
    new = []
    for annotator in pool:
        regular = sum(1 for item, a in holders.items() if item not in gold and annotator in a)
        have = sum(1 for item in gold if annotator in holders[item])
        # gold / (regular + gold) = fraction  <=>  gold = fraction * regular / (1 - fraction)
        want = round(fraction * regular / (1 - fraction)) - have
        unseen = sorted((item for item in gold if annotator not in holders[item]), key=lambda i: (len(holders[i]), i))
        for item in unseen[: max(0, want)]:
            holders[item].add(annotator)
            new.append((item, annotator))
    return new


def _sort_key(item_id: int, annotator_id: int) -> float:
    """A fixed pseudo-random position, so that each annotator's queue interleaves gold and regular items."""
    return random.Random(f"{item_id}:{annotator_id}").random()


def _check_assignment_id(annotator: Annotator, assignment_id: int) -> None:
    if not 0 < assignment_id <= MAX_ROW_ID:
        raise NotFound(f"no assignment {assignment_id} for {annotator.name}")


def _check_task(task: str, expected: str) -> None:
    if task != expected:
        raise InvalidLabel(f"this item is a {task} task, not a {expected} task")


def _check_scores(scores: dict[str, int], known: set[str]) -> None:
    low, high = LIKERT
    if set(scores) != known:
        raise InvalidLabel("the rating must score every completion of the item exactly once")
    for completion_id, score in scores.items():
        if isinstance(score, bool) or not isinstance(score, int) or not low <= score <= high:
            raise InvalidLabel(f"score of {completion_id!r} must be a whole number from {low} to {high}, got {score!r}")


def _check_comments(comments: dict[str, str], known: set[str], max_chars: int) -> dict[str, str]:
    kept = {}
    for completion_id, comment in comments.items():
        if completion_id not in known:
            raise InvalidLabel(f"comment on unknown completion {completion_id!r}")
        if len(comment) > max_chars:
            raise InvalidLabel(f"comment on {completion_id!r} is over labeling.max_text_chars={max_chars} characters")
        if comment.strip():
            kept[completion_id] = comment.strip()
    return kept


def _insert_label(db: sqlite3.Connection, assignment_id: int, *, flags: dict[str, str], skipped: int = 0, **columns) -> None:
    """Insert one label row; ``columns`` are the task's own columns (names from this module only)."""
    names = ["assignment_id", "skipped", "flags_json", "created_at", *columns]
    values = [assignment_id, skipped, json.dumps(flags, sort_keys=True), now_utc().isoformat(), *columns.values()]
    try:
        db.execute(f"INSERT INTO labels ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})", values)
    except sqlite3.IntegrityError:
        raise AlreadyLabelled(f"assignment {assignment_id} is already labelled") from None


def _check_flags(flags: dict[str, str], known: set[str]) -> None:
    for completion_id, flag in flags.items():
        if completion_id not in known:
            raise InvalidLabel(f"flag for unknown completion {completion_id!r}")
        if flag not in FLAGS:
            raise InvalidLabel(f"unknown flag {flag!r} (expected one of {', '.join(FLAGS)})")


def _check_groups(groups: list[list[str]], known: set[str]) -> tuple[list[str], list[int]]:
    ids, ranks = ranks_from_groups(groups)
    if any(not group for group in groups):
        raise InvalidLabel("a rank group is empty")
    if len(set(ids)) != len(ids):
        raise InvalidLabel("the ranking names a completion twice")
    if set(ids) != known:
        raise InvalidLabel("the ranking must name every completion of the item exactly once")
    return ids, ranks


def _label_row(
    label_id: int, annotator: str, created_at: str, skipped: int, flags_json: str,
    ids_json: str | None, ranks_json: str | None, prompt_id: str, task: str,
) -> LabelRow:
    created = datetime.fromisoformat(created_at)
    flags = json.loads(flags_json)
    ranking = None
    if not skipped and task == "ranking":
        ranking = Ranking(
            id=f"label-{label_id}",
            prompt_id=prompt_id,
            completion_ids=json.loads(ids_json),
            ranks=json.loads(ranks_json),
            annotator_id=annotator,
            created_at=created,
            source="human",
            flags=flags,
        )
    return LabelRow(annotator, created, bool(skipped), flags, ranking, task)
