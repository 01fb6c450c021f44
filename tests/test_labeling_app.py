"""The labelling web app: authentication, isolation between annotators, escaping, concurrency and crash safety.

The in-process tests use FastAPI's TestClient; the concurrency and crash tests
run ``rlhf label serve`` as a real server process on a free loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import select
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from rlhf_core.cli import main as rlhf_main
from rlhf_core.config import load_params
from rlhf_core.labeling.app import create_app
from rlhf_core.labeling.guards import MAX_BODY_BYTES, BodyLimit
from rlhf_core.labeling.store import LabelStore
from rlhf_core.preferences import PreferenceBundle
from rlhf_core.schemas import Completion, Prompt
from tests.conftest import BIN, write_params

XSS = "<script>alert(1)</script>"


def write_candidates(folder: Path, prompts: int, k: int = 4, xss: bool = False) -> Path:
    """A bundle like the one generate_candidates writes: prompts.jsonl and completions.jsonl."""
    bundle = PreferenceBundle()
    for p in range(prompts):
        bundle.prompts.append(Prompt(id=f"p{p}", text=f"Question {p}: how do I write <b>bold</b> in HTML?"))
        for c in range(k):
            text = f"{XSS} answer {c}" if xss and c == 0 else f"Answer {c} to question {p}."
            bundle.completions.append(Completion(id=f"p{p}-c{c}", prompt_id=f"p{p}", text=text, policy_version="v0"))
    bundle.write(folder)
    return folder


def rlhf_in_process(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert rlhf_main(list(args)) == 0
    return out.getvalue()


def set_up_project(root: Path, *, prompts: int, annotators: list[str], per_item: int = 1, xss: bool = False) -> dict[str, str]:
    """Load candidates and add annotators through the CLI; returns name -> token (plus an admin)."""
    write_params(root, {"labeling": {"assignments_per_item": per_item}})
    rlhf_in_process("label", "load", str(write_candidates(root / "candidates", prompts, xss=xss)))
    tokens = {name: rlhf_in_process("label", "add-annotator", name).splitlines()[0] for name in annotators}
    tokens["admin"] = rlhf_in_process("label", "add-annotator", "admin", "--admin").splitlines()[0]
    return tokens


def open_store(root: Path) -> LabelStore:
    return LabelStore(root / load_params(root / "params.yaml").paths.labels_db)


@pytest.fixture
def app_project(work_env):
    tokens = set_up_project(work_env, prompts=4, annotators=["ann", "bob"], xss=True)
    params = load_params(work_env / "params.yaml")
    client = TestClient(create_app(open_store(work_env), params.labeling), follow_redirects=False)
    return client, tokens


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def ranking_of(assignment: dict) -> list[list[str]]:
    return [[c["id"]] for c in assignment["completions"]]


def test_without_a_token_the_api_says_401_and_pages_redirect(app_project):
    client, _ = app_project
    assert client.get("/api/next").status_code == 401
    assert client.get("/api/progress", headers=bearer("not-a-token")).status_code == 401
    assert client.post("/api/assignments/1/label", json={"ranking": [["p0-c0"]]}).status_code == 401
    assert client.post("/api/assignments/1/skip", json={}).status_code == 401
    for page in ("/label", "/admin", "/"):
        response = client.get(page)
        assert response.status_code == 303 and response.headers["location"] == "/signin"
    assert client.post("/signin", data={"token": "wrong"}).status_code == 401


def test_sign_in_sets_a_strict_http_only_cookie_and_sign_out_ends_it(app_project):
    client, tokens = app_project
    response = client.post("/signin", data={"token": tokens["ann"]})
    assert response.status_code == 303 and response.headers["location"] == "/label"
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    page = client.get("/label")
    assert page.status_code == 200 and "Done 0 of 2" in page.text
    assert client.get("/api/progress").json() == {"done": 0, "assigned": 2}
    assert client.get("/admin").status_code == 403
    client.post("/signout")
    assert client.get("/api/progress").status_code == 401


def test_annotator_cannot_read_or_write_another_annotators_assignment(app_project):
    client, tokens = app_project
    bobs = client.get("/api/next", headers=bearer(tokens["bob"])).json()["assignment"]
    as_ann = bearer(tokens["ann"])
    assert client.get(f"/api/assignments/{bobs['id']}", headers=as_ann).status_code == 404
    assert client.post(f"/api/assignments/{bobs['id']}/label", headers=as_ann, json={"ranking": ranking_of(bobs)}).status_code == 404
    assert client.post(f"/api/assignments/{bobs['id']}/skip", headers=as_ann, json={}).status_code == 404
    assert client.get(f"/api/assignments/{bobs['id']}", headers=bearer(tokens["bob"])).json()["labelled"] is False
    assert client.get("/api/admin/stats", headers=as_ann).status_code == 403
    assert client.get("/api/admin/stats", headers=bearer(tokens["admin"])).json()["labels"] == 0


def test_labels_are_validated_and_never_stored_twice(app_project):
    client, tokens = app_project
    headers = bearer(tokens["ann"])
    item = client.get("/api/next", headers=headers).json()["assignment"]
    url = f"/api/assignments/{item['id']}/label"
    assert client.post(url, headers=headers, json={"ranking": ranking_of(item)[:2]}).status_code == 422
    assert client.post(url, headers=headers, json={"ranking": ranking_of(item), "flags": {"x": "unsafe"}}).status_code == 422
    done = client.post(url, headers=headers, json={"ranking": ranking_of(item)})
    assert done.status_code == 200 and done.json()["progress"] == {"done": 1, "assigned": 2}
    assert client.post(url, headers=headers, json={"ranking": ranking_of(item)}).status_code == 409
    assert client.get("/api/next", headers=headers).json()["assignment"]["id"] != item["id"]


def test_model_written_markup_renders_as_text_under_a_strict_csp(app_project):
    client, tokens = app_project
    client.post("/signin", data={"token": tokens["ann"]})
    page = client.get("/label")
    assert "&lt;script&gt;alert(1)&lt;/script&gt; answer 0" in page.text
    assert XSS not in page.text and "<b>bold</b>" not in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert "<script>" not in page.text.replace('<script src="/static/app.js" defer></script>', "")
    api = client.get("/api/next").json()["assignment"]
    assert any(c["text"].startswith(XSS) for c in api["completions"])  # JSON keeps the text as it is


def test_admin_page_escapes_names_and_shows_agreement(work_env):
    tokens = set_up_project(work_env, prompts=2, annotators=["<i>eve</i>", "bob"], per_item=2)
    client = TestClient(create_app(open_store(work_env), load_params("params.yaml").labeling), follow_redirects=False)
    for name in ("<i>eve</i>", "bob"):
        while (item := client.get("/api/next", headers=bearer(tokens[name])).json()["assignment"]) is not None:
            ids = sorted(c["id"] for c in item["completions"])
            order = [ids[:2], *[[i] for i in ids[2:]]] if name == "bob" else [[i] for i in ids]
            client.post(f"/api/assignments/{item['id']}/label", headers=bearer(tokens[name]), json={"ranking": order})
    client.post("/signin", data={"token": tokens["admin"]})
    page = client.get("/admin")
    assert page.status_code == 200
    assert "&lt;i&gt;eve&lt;/i&gt;" in page.text and "<i>eve</i>" not in page.text
    # 2 prompts x 6 pairs; on each prompt bob ties one pair that eve orders -> (10 + 2 * 0.5) / 12
    assert '<dd id="agreement">91.7 %</dd>' in page.text
    assert "12 comparisons" in page.text
    stats = json.loads(rlhf_in_process("label", "stats", "--json"))
    assert stats["pairwise_agreement"] == pytest.approx(11 / 12) and stats["labels"] == 4


def test_load_keeps_good_items_and_reports_bad_ones(work_env, capsys):
    folder = write_candidates(work_env / "candidates", prompts=3)
    with (folder / "completions.jsonl").open("a") as handle:
        handle.write("{not json\n")
        handle.write(json.dumps({"id": "p0-c9", "prompt_id": "p0", "text": "", "policy_version": "v0"}) + "\n")
    out = rlhf_in_process("label", "load", str(folder))
    assert "3 new ranking items (0 already loaded)" in out and "2 rejects written to" in out
    rejects = [json.loads(line) for line in (work_env / ".work" / "label_load_rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["field"], r["kind"]) for r in rejects] == [(13, None, "invalid"), (0, "text", "empty")]
    assert "3 new ranking items" not in rlhf_in_process("label", "load", str(folder))
    assert rlhf_main(["label", "load", str(work_env / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err


# -- request guards: origin, size, ids --------------------------------------------------------------------------

FOREIGN = "http://127.0.0.1:3000"  # another local program's page: same site as the app, other origin


def session_count(root: Path) -> int:
    return sqlite3.connect(root / ".work" / "labels.sqlite").execute("SELECT COUNT(*) FROM sessions").fetchone()[0]


def test_a_foreign_origin_sign_in_is_refused_and_sets_no_cookie(app_project, work_env):
    client, tokens = app_project
    for headers in ({"Origin": FOREIGN}, {"Origin": "null"}, {"Referer": f"{FOREIGN}/form"},
                    {"Origin": "https://testserver"}, {"Origin": "http://testserver:8080"}, {"Origin": "garbage"}):
        response = client.post("/signin", data={"token": tokens["ann"]}, headers=headers)
        assert response.status_code == 403, headers
        assert "set-cookie" not in response.headers and "cross-origin" in response.json()["detail"]
        assert response.headers["content-security-policy"].startswith("default-src 'none'")
    assert session_count(work_env) == 0 and not client.cookies
    # The app's own pages (Origin, or Referer alone) and scripts sending neither header sign in.
    for headers in ({"Origin": "http://testserver"}, {"Referer": "http://testserver/signin"}, {}):
        response = client.post("/signin", data={"token": tokens["ann"]}, headers=headers)
        assert response.status_code == 303 and "rlhf_session=" in response.headers["set-cookie"]
    assert session_count(work_env) == 3


def test_state_changing_requests_from_another_origin_are_refused(app_project):
    client, tokens = app_project
    client.post("/signin", data={"token": tokens["ann"]}, headers={"Origin": "http://testserver"})
    item = client.get("/api/next", headers={"Origin": FOREIGN}).json()["assignment"]  # reads are not refused
    url = f"/api/assignments/{item['id']}/label"
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        assert client.request(method, url, json={"ranking": ranking_of(item)}, headers={"Origin": FOREIGN}).status_code == 403
    assert client.post(url, json={"ranking": ranking_of(item)}, headers={"Referer": f"{FOREIGN}/"}).status_code == 403
    assert client.post(url.replace("label", "skip"), json={}, headers={"Origin": FOREIGN, **bearer(tokens["ann"])}).status_code == 403
    assert client.post("/signout", headers={"Origin": FOREIGN}).status_code == 403
    assert client.get("/api/progress").json() == {"done": 0, "assigned": 2}  # still signed in, nothing stored
    done = client.post(url, json={"ranking": ranking_of(item)}, headers={"Origin": "http://testserver"})
    assert done.status_code == 200 and done.json()["progress"]["done"] == 1


def test_loopback_names_count_as_one_origin_on_the_same_port(work_env):
    tokens = set_up_project(work_env, prompts=1, annotators=["ann"])
    app = create_app(open_store(work_env), load_params("params.yaml").labeling)
    client = TestClient(app, base_url="http://127.0.0.1:8765", follow_redirects=False)
    form = {"token": tokens["ann"]}
    for origin in ("http://localhost:8765", "http://127.0.0.1:8765", "http://[::1]:8765"):
        assert client.post("/signin", data=form, headers={"Origin": origin}).status_code == 303, origin
    for origin in ("http://localhost:8766", "https://localhost:8765", "http://localhost.evil.example:8765",
                   "http://localhost:99999"):
        assert client.post("/signin", data=form, headers={"Origin": origin}).status_code == 403, origin


def test_bodies_over_the_limit_get_413_before_they_are_read(app_project):
    client, tokens = app_project
    headers = {**bearer(tokens["ann"]), "Content-Type": "application/json"}
    item = client.get("/api/next", headers=headers).json()["assignment"]
    url = f"/api/assignments/{item['id']}/label"
    huge = b'{"ranking": [["' + b"x" * (50 * 2**20) + b'"]]}'
    started = time.monotonic()
    response = client.post(url, content=huge, headers=headers)
    assert response.status_code == 413 and "over 1048576 bytes" in response.json()["detail"]
    assert time.monotonic() - started < 10  # refused from Content-Length: nothing of the body is parsed
    assert client.post("/signin", content=b"token=" + b"x" * (MAX_BODY_BYTES + 1)).status_code == 413
    assert client.get("/api/progress", headers=headers).json()["done"] == 0
    padded = json.dumps({"ranking": ranking_of(item)}).encode() + b" " * (MAX_BODY_BYTES - 200)
    assert client.post(url, content=padded, headers=headers).status_code == 200  # under the limit: accepted


def test_a_chunked_body_is_counted_as_it_arrives_and_cut_off_past_the_limit():
    """At the ASGI level: a 50 MB body without Content-Length, in 64 KiB chunks, is refused after ~1 MiB."""
    chunk = b"x" * 2**16
    pulled = 0
    reached_route = []

    async def receive():
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": chunk, "more_body": pulled < 800}

    async def route(scope, receive, send):
        reached_route.append(scope["path"])

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/api/x", "headers": [(b"transfer-encoding", b"chunked")]}
    asyncio.run(BodyLimit(route)(scope, receive, send))
    assert sent[0]["status"] == 413 and not reached_route
    assert pulled == MAX_BODY_BYTES // len(chunk) + 1  # 17 chunks of 800 read, the 17th passing the limit

    async def short_body():
        return {"type": "http.request", "body": b'{"a": 1}', "more_body": False}

    async def echo(scope, receive, send):
        reached_route.append((await receive())["body"])

    asyncio.run(BodyLimit(echo)(scope, short_body, send))
    assert reached_route == [b'{"a": 1}']


@pytest.mark.parametrize(
    ("assignment_id", "status"),
    [(str(2**64), 404), (str(2**63), 404), (str(2**63 - 1), 404), ("-1", 404), ("0", 404), ("-" + str(2**64), 404),
     ("abc", 422), ("1.5", 422), ("1e3", 422), ("9" * 5000, 422), ("%00", 422)],
)
def test_assignment_ids_out_of_range_or_malformed_give_404_or_422(app_project, assignment_id, status):
    client, tokens = app_project
    headers = bearer(tokens["ann"])
    assert client.get(f"/api/assignments/{assignment_id}", headers=headers).status_code == status
    assert client.post(f"/api/assignments/{assignment_id}/label", headers=headers, json={"ranking": [["a"]]}).status_code == status
    assert client.post(f"/api/assignments/{assignment_id}/skip", headers=headers, json={}).status_code == status


def test_serving_on_a_non_loopback_address_warns_but_starts(work_env, monkeypatch, capsys):
    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **_: served.append((host, port)))
    write_params(work_env, {"labeling": {"host": "0.0.0.0"}})
    assert rlhf_main(["label", "serve", "--port", "9000"]) == 0
    err = capsys.readouterr().err
    assert served == [("0.0.0.0", 9000)]
    assert "warning: labeling.host 0.0.0.0 is not a loopback address" in err
    assert "reachable from the network" in err and "reverse proxy with TLS" in err
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        write_params(work_env, {"labeling": {"host": host}})
        assert rlhf_main(["label", "serve"]) == 0
        assert "warning" not in capsys.readouterr().err, host


# -- a real server process ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def live_server(root: Path):
    """``rlhf label serve`` on a free 127.0.0.1 port; yields its base URL and process."""
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "rlhf"), "label", "serve", "--port", str(port)], cwd=root,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/signin", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start:\n{process.communicate()[0]}")
            time.sleep(0.1)
        yield url, process
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=10)
        if process.stdout:
            process.stdout.close()


def label_everything(url: str, token: str, record: list[tuple[int, int]]) -> None:
    """One annotator's session: fetch the next item, rank it, and send every label twice (a double click)."""
    with httpx.Client(base_url=url, headers=bearer(token), timeout=30) as client:
        while (item := client.get("/api/next").json()["assignment"]) is not None:
            for _ in range(2):
                response = client.post(f"/api/assignments/{item['id']}/label", json={"ranking": ranking_of(item)})
                record.append((item["id"], response.status_code))


@pytest.mark.slow
def test_eight_annotators_labelling_at_once_lose_and_duplicate_nothing(work_env):
    names = [f"a{i}" for i in range(8)]
    tokens = set_up_project(work_env, prompts=24, annotators=names, per_item=2)
    records: dict[str, list[tuple[int, int]]] = {name: [] for name in names}
    with live_server(work_env) as (url, _):
        threads = [threading.Thread(target=label_everything, args=(url, tokens[n], records[n])) for n in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads)
        progress = [httpx.get(f"{url}/api/progress", headers=bearer(tokens[n])).json() for n in names]
    assert [p["assigned"] for p in progress] == [6] * 8 and [p["done"] for p in progress] == [6] * 8
    statuses = Counter(status for record in records.values() for _, status in record)
    assert statuses == {200: 48, 409: 48}
    rows = sqlite3.connect(work_env / ".work" / "labels.sqlite").execute(
        "SELECT a.item_id, n.name FROM labels l JOIN assignments a ON a.id = l.assignment_id"
        " JOIN annotators n ON n.id = a.annotator_id"
    ).fetchall()
    assert len(rows) == len(set(rows)) == 48
    assert Counter(item for item, _ in rows) == {item: 2 for item in range(1, 25)}


def post_until_killed(url: str, token: str, ids: list[int], accepted: list[int]) -> None:
    with httpx.Client(base_url=url, headers=bearer(token), timeout=10) as client:
        for assignment_id in ids:
            ranking = [[f"p{assignment_id - 1}-c{c}"] for c in range(4)]
            try:
                response = client.post(f"/api/assignments/{assignment_id}/label", json={"ranking": ranking})
            except httpx.TransportError:
                return
            if response.status_code == 200:
                accepted.append(assignment_id)


@pytest.mark.slow
def test_killing_the_server_mid_write_loses_no_acknowledged_label(work_env):
    tokens = set_up_project(work_env, prompts=400, annotators=["solo"])
    accepted: list[list[int]] = [[] for _ in range(4)]
    with live_server(work_env) as (url, process):
        writers = [
            threading.Thread(target=post_until_killed, args=(url, tokens["solo"], list(range(w + 1, 401, 4)), accepted[w]))
            for w in range(4)
        ]
        for writer in writers:
            writer.start()
        while sum(map(len, accepted)) < 40:
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
        for writer in writers:
            writer.join(timeout=30)
    acknowledged = {i for ids in accepted for i in ids}
    assert 40 <= len(acknowledged) < 400  # killed in the middle of the stream
    db = sqlite3.connect(work_env / ".work" / "labels.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = {row[0] for row in db.execute("SELECT assignment_id FROM labels")}
    assert acknowledged <= stored
    assert len(stored) - len(acknowledged) <= 4  # at most the requests in flight when the server died


def send_until_answered(port: int, head: bytes, chunk: bytes = b"", most: int = 0) -> tuple[bytes, int]:
    """Send ``head``, then ``chunk`` after ``chunk`` (up to ``most`` bytes) until the server answers; returns
    (the start of its answer, body bytes sent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        sent = 0
        while sent < most and not select.select([sock], [], [], 0)[0]:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        return sock.recv(4096), sent


@pytest.mark.slow
def test_a_real_server_refuses_a_50_mb_body_without_waiting_for_it(work_env):
    tokens = set_up_project(work_env, prompts=1, annotators=["ann"])
    with live_server(work_env) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        head = (f"POST /api/assignments/1/label HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer"
                f" {tokens['ann']}\r\nContent-Type: application/json\r\n")
        # Declared 50 MB, not one byte sent: the answer comes from the headers alone.
        answer, _ = send_until_answered(port, f"{head}Content-Length: {50 * 2**20}\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 413 ")
        # Chunked, no length: cut off once the count passes the limit, long before 50 MB are sent.
        chunk = b"%x\r\n%s\r\n" % (2**16, b"x" * 2**16)
        answer, sent = send_until_answered(port, f"{head}Transfer-Encoding: chunked\r\n\r\n".encode(), chunk, 50 * 2**20)
        assert answer.startswith(b"HTTP/1.1 413 ")
        assert sent < 16 * 2**20  # the limit plus what the kernel's socket buffers hold
        assert httpx.get(f"{url}/api/progress", headers=bearer(tokens["ann"])).json() == {"done": 0, "assigned": 1}


# -- rating and demonstration tasks ----------------------------------------------------------------------------

END_TEXTAREA = "</textarea><script>alert(2)</script>"


def write_prompts(folder: Path, prompts: int, *, drafts: bool) -> Path:
    """Prompts for demonstrations (one carrying markup that would end a textarea), with a model draft each if asked."""
    bundle = PreferenceBundle()
    for p in range(prompts):
        bundle.prompts.append(Prompt(id=f"d{p}", text=f"Explain {END_TEXTAREA} in one paragraph ({p})."))
        if drafts:
            text = f"{END_TEXTAREA} Draft {p}: a first try." if p == 0 else f"Draft {p}: a first try."
            bundle.completions.append(Completion(id=f"d{p}-draft", prompt_id=f"d{p}", text=text, policy_version="v0"))
    bundle.write(folder)
    return folder


def set_up_tasks(
    root: Path, annotators: list[str], *, per_item: int = 1, tasks: tuple[str, ...] = ("rating", "demonstration")
) -> dict[str, str]:
    """Rating items (2 prompts x 3 completions, one with a script) and demonstration items (2 prompts with drafts),
    loaded through the CLI; returns name -> token (plus an admin)."""
    write_params(root, {"labeling": {"assignments_per_item": per_item}})
    if "rating" in tasks:
        rlhf_in_process("label", "load", str(write_candidates(root / "rate", 2, k=3, xss=True)), "--task", "rating")
    if "demonstration" in tasks:
        rlhf_in_process("label", "load", str(write_prompts(root / "write", 2, drafts=True)), "--task", "demonstration")
    tokens = {name: rlhf_in_process("label", "add-annotator", name).splitlines()[0] for name in annotators}
    tokens["admin"] = rlhf_in_process("label", "add-annotator", "admin", "--admin").splitlines()[0]
    return tokens


@pytest.fixture
def task_project(work_env):
    tokens = set_up_tasks(work_env, ["ann", "bob"], per_item=2)
    client = TestClient(create_app(open_store(work_env), load_params("params.yaml").labeling), follow_redirects=False)
    return client, tokens


def next_of_task(client: TestClient, headers: dict, task: str) -> dict:
    """The annotator's next item, skipping items of other tasks on the way."""
    while (item := client.get("/api/next", headers=headers).json()["assignment"])["task"] != task:
        assert client.post(f"/api/assignments/{item['id']}/skip", headers=headers, json={}).status_code == 200
    return item


def test_load_takes_a_task_and_refuses_gold_for_other_tasks(work_env, capsys):
    write_params(work_env)
    out = rlhf_in_process("label", "load", str(write_prompts(work_env / "bare", 3, drafts=False)), "--task", "demonstration")
    assert "3 new demonstration items (0 already loaded)" in out
    assert "2 new rating items" in rlhf_in_process("label", "load", str(write_candidates(work_env / "c", 2)), "--task", "rating")
    assert "2 new ranking items" in rlhf_in_process("label", "load", str(work_env / "c"))  # same candidates, other task
    assert rlhf_main(["label", "load", str(work_env / "c"), "--task", "rating", "--gold"]) == 2
    assert "--gold loads known rankings: it goes with --task ranking" in capsys.readouterr().err


def test_rating_api_checks_scores_and_keeps_annotators_apart(task_project):
    client, tokens = task_project
    ann, bob = bearer(tokens["ann"]), bearer(tokens["bob"])
    item = next_of_task(client, ann, "rating")
    assert item["scale"] == [1, 7] and len(item["completions"]) == 3
    url = f"/api/assignments/{item['id']}/rating"
    scores = {c["id"]: 5 for c in item["completions"]}
    first = item["completions"][0]["id"]
    for bad in ({**scores, first: True}, {**scores, first: 4.5}, {**scores, first: "5"}, {**scores, first: 0},
                {first: 5}, {}):
        assert client.post(url, headers=ann, json={"scores": bad}).status_code == 422, bad
    assert client.post(url, headers=ann, json={"scores": scores, "extra": 1}).status_code == 422
    assert client.post(url, headers=bob, json={"scores": scores}).status_code == 404
    assert client.post(url.replace("rating", "label"), headers=ann, json={"ranking": [[i] for i in scores]}).status_code == 422
    assert client.post(url.replace("rating", "demonstration"), headers=ann, json={"text": "hi"}).status_code == 422
    done = client.post(url, headers=ann, json={"scores": scores, "comments": {first: "Too short."}, "flags": {first: "nonsense"}})
    assert done.status_code == 200
    assert client.post(url, headers=ann, json={"scores": scores}).status_code == 409
    tasks = client.get("/api/next", headers=ann).json()["tasks"]
    assert tasks["rating"] == {"done": 1, "assigned": 2} and tasks["demonstration"]["assigned"] == 2


def test_demonstration_api_takes_the_text_as_written_within_limits(task_project, work_env):
    client, tokens = task_project
    ann = bearer(tokens["ann"])
    item = next_of_task(client, ann, "demonstration")
    assert item["words"] == [15, 60] and item["max_chars"] == 8000 and len(item["completions"]) == 1
    url = f"/api/assignments/{item['id']}/demonstration"
    assert client.post(url, headers=ann, json={"text": " \n "}).status_code == 422
    assert "over labeling.max_text_chars=8000" in client.post(url, headers=ann, json={"text": "w " * 4001}).json()["detail"]
    assert client.post(url, headers=ann, json={"text": 5}).status_code == 422
    assert client.post(url, headers=bearer(tokens["bob"]), json={"text": "mine"}).status_code == 404
    text = "  Line one.\n\nLine two, <b>kept</b> as typed.  "
    assert client.post(url, headers=ann, json={"text": text}).status_code == 200
    assert client.post(url, headers=ann, json={"text": text}).status_code == 409
    [row] = open_store(work_env).demonstrations()
    assert row.text == text and row.draft.id == item["completions"][0]["id"] and row.annotator == "ann"


def test_a_huge_demonstration_is_refused_by_the_size_limit_and_nothing_is_stored(task_project, work_env):
    client, tokens = task_project
    headers = {**bearer(tokens["ann"]), "Content-Type": "application/json"}
    item = next_of_task(client, headers, "demonstration")
    huge = json.dumps({"text": "word " * (MAX_BODY_BYTES // 5 + 10)}).encode()
    response = client.post(f"/api/assignments/{item['id']}/demonstration", content=huge, headers=headers)
    assert response.status_code == 413 and response.headers["content-security-policy"].startswith("default-src 'none'")
    assert open_store(work_env).demonstrations() == []
    # The largest text the store accepts, every character escaped by JSON, still fits under the body limit.
    widest = json.dumps({"text": "\U0001f600" * 8000}).encode()
    assert len(widest) < MAX_BODY_BYTES
    assert client.post(f"/api/assignments/{item['id']}/demonstration", content=widest, headers=headers).status_code == 200


def test_rating_and_demonstration_pages_escape_prompts_drafts_and_completions(task_project):
    client, tokens = task_project
    client.post("/signin", data={"token": tokens["ann"]})
    seen = set()
    while (item := client.get("/api/next").json()["assignment"]) is not None:
        page = client.get("/label")
        assert page.status_code == 200 and "unsafe-inline" not in page.headers["content-security-policy"]
        body = page.text
        for tag in ('<script src="/static/submit.js" defer></script>', f'<script src="/static/{item["task"]}.js" defer></script>'):
            body = body.replace(tag, "")
        assert "<script" not in body and "</textarea><script>" not in body
        if item["task"] == "demonstration":
            assert "Explain &lt;/textarea&gt;&lt;script&gt;alert(2)&lt;/script&gt; in one paragraph" in page.text
            assert 'data-min-words="15" data-max-words="60"' in page.text and "Aim for 15–60 words" in page.text
            # The draft shows beside the prompt and starts the answer box, escaped both times.
            draft = item["completions"][0]["text"].replace("<", "&lt;").replace(">", "&gt;")
            assert page.text.count(draft) == 2 and 'id="restore"' in page.text
        else:
            assert "&lt;script&gt;alert(1)&lt;/script&gt; answer 0" in page.text or item["prompt"]["id"] != "p0"
            assert page.text.count('type="radio"') == 3 * 7
        assert "rating 0/2, demonstration 0/2" in page.text or seen  # per-task progress in the top bar
        seen.add(item["task"])
        client.post(f"/api/assignments/{item['id']}/skip", json={})
    assert seen == {"rating", "demonstration"}


def test_admin_stats_report_each_task(work_env):
    tokens = set_up_tasks(work_env, ["ann", "bob"], per_item=2)
    client = TestClient(create_app(open_store(work_env), load_params("params.yaml").labeling), follow_redirects=False)
    for name in ("ann", "bob"):
        headers = bearer(tokens[name])
        while (item := client.get("/api/next", headers=headers).json()["assignment"]) is not None:
            if item["task"] == "rating":
                scores = {c["id"]: 6 if c["id"].endswith("c0") else 2 for c in item["completions"]}
                if name == "bob" and item["prompt"]["id"] == "p1":
                    scores["p1-c1"] = 3
                client.post(f"/api/assignments/{item['id']}/rating", headers=headers, json={"scores": scores})
            else:
                draft = item["completions"][0]["text"]
                text = draft if name == "ann" else draft + " " + " ".join(["more"] * 20)
                client.post(f"/api/assignments/{item['id']}/demonstration", headers=headers, json={"text": text})
    stats = client.get("/api/admin/stats", headers=bearer(tokens["admin"])).json()
    assert [(t["task"], t["items"], t["labels"]) for t in stats["tasks"]] == [("rating", 2, 4), ("demonstration", 2, 4)]
    assert stats["rating"]["pairable_units"] == 6 and 0 < stats["rating"]["krippendorff_alpha_interval"] < 1
    demo = stats["demonstration"]
    assert (demo["demonstrations"], demo["with_draft"], demo["unchanged_drafts"], demo["mean_edit_distance"]) == (4, 4, 2, 10)
    client.post("/signin", data={"token": tokens["admin"]})
    page = client.get("/admin").text
    assert f'<dd id="rating-alpha">{stats["rating"]["krippendorff_alpha_interval"]:.3f}</dd>' in page
    assert '<dd id="edit-distance">10.0 words</dd>' in page and "Within 15–60 words" in page
    printed = rlhf_in_process("label", "stats")
    assert "rating: 2 items, 4 labels (0 skipped)" in printed and "demonstration: 2 items, 4 labels" in printed
    assert f"Krippendorff's alpha (interval) {stats['rating']['krippendorff_alpha_interval']:.3f} over 6 completions" in printed
    assert "4 from a draft (2 unchanged), edit distance 10.0 words" in printed
