"""The labelling web app (FastAPI): sign-in, the labelling page, the admin page and a small JSON API.

Three tasks share it: ranking an item's completions, rating each on a 1-7
scale, and writing a demonstration (the ideal answer, optionally from a model
draft).  Each has its own submit route; skip works for all of them.

Who is asking: a session cookie set at sign-in (HttpOnly, SameSite=Strict, so
other sites can neither read it nor make the browser send it), or an
``Authorization: Bearer <token>`` header for scripts.  API calls without either
get 401, pages redirect to the sign-in page.  An annotator only ever sees its
own assignments: anyone else's answer 404, exactly like ones that do not exist.
Before any route, :mod:`rlhf_core.labeling.guards` refuses state-changing
requests from other origins (403) and bodies over the size limit (413).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.concurrency import run_in_threadpool

from rlhf_core.config import LabelingConfig
from rlhf_core.labeling import pages
from rlhf_core.labeling.guards import BodyLimit, SameOriginOnly
from rlhf_core.labeling.stats import label_stats
from rlhf_core.labeling.store import (
    LIKERT,
    AlreadyLabelled,
    Annotator,
    Assignment,
    InvalidLabel,
    LabelStore,
    NotFound,
    Progress,
)

STATIC = Path(__file__).parent / "static"
SESSION_COOKIE = "rlhf_session"

SECURITY_HEADERS = {
    # Only this app's own files may run or style the page: an injected <script> or inline handler cannot execute.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Other sites get no Referer; the app's own form posts keep their Origin, which the origin check needs
    # (under "no-referrer" browsers send "Origin: null" on a form post, as opaque documents do).
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class LabelBody(BaseModel):
    """A ranking: tie groups from best to worst, e.g. ``[["c2"], ["c1", "c3"], ["c4"]]``; flags per completion."""

    model_config = ConfigDict(extra="forbid")
    ranking: list[list[str]] = Field(min_length=1)
    flags: dict[str, str] = Field(default_factory=dict)


class SkipBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    flags: dict[str, str] = Field(default_factory=dict)


class RatingBody(BaseModel):
    """Scores per completion id, 1 (worst) to 7 (best); optional comments and flags per completion."""

    model_config = ConfigDict(extra="forbid")
    # Strict: JSON true or 4.5 is not a score (lax mode would read them as 1 and refuse only the second).
    scores: dict[str, StrictInt] = Field(min_length=1)
    comments: dict[str, str] = Field(default_factory=dict)
    flags: dict[str, str] = Field(default_factory=dict)


class DemonstrationBody(BaseModel):
    """The answer the annotator wrote, as written."""

    model_config = ConfigDict(extra="forbid")
    text: str


def create_app(store: LabelStore, cfg: LabelingConfig) -> FastAPI:
    app = FastAPI(title="Preference labelling", docs_url=None, redoc_url=None, openapi_url=None)
    # The last added runs first: the origin check, then the size limit; refusals still get the security headers.
    app.add_middleware(BodyLimit)
    app.add_middleware(SameOriginOnly)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _add_pages(app, store, cfg)
    _add_api(app, store, cfg)
    return app


def _who(request: Request, store: LabelStore) -> Annotator | None:
    authorization = request.headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        return store.annotator_by_token(authorization[7:].strip())
    session_id = request.cookies.get(SESSION_COOKIE)
    return store.session_annotator(session_id) if session_id else None


def _html(text: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(text, status_code=status)


def _add_pages(app: FastAPI, store: LabelStore, cfg: LabelingConfig) -> None:
    @app.get("/")
    def home(request: Request) -> Response:
        annotator = _who(request, store)
        if annotator is None:
            return RedirectResponse("/signin", status_code=303)
        return RedirectResponse("/admin" if annotator.is_admin else "/label", status_code=303)

    @app.get("/signin")
    def signin_form() -> Response:
        return _html(pages.signin_page())

    @app.post("/signin")
    async def signin(request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", errors="replace"))
        token = (form.get("token") or [""])[0].strip()
        annotator = await run_in_threadpool(store.annotator_by_token, token) if token else None
        if annotator is None:
            return _html(pages.signin_page("Unknown token."), 401)
        session_id = await run_in_threadpool(store.start_session, annotator, cfg.session_hours)
        response = RedirectResponse("/admin" if annotator.is_admin else "/label", status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            session_id,
            max_age=int(cfg.session_hours * 3600),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return response

    @app.post("/signout")
    def signout(request: Request) -> Response:
        session_id = request.cookies.get(SESSION_COOKIE)
        if session_id:
            store.end_session(session_id)
        response = RedirectResponse("/signin", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @app.get("/label")
    def label(request: Request) -> Response:
        annotator = _who(request, store)
        if annotator is None:
            return RedirectResponse("/signin", status_code=303)
        return _html(pages.label_page(annotator, store.progress(annotator), store.next_assignment(annotator), cfg))

    @app.get("/admin")
    def admin(request: Request) -> Response:
        annotator = _who(request, store)
        if annotator is None:
            return RedirectResponse("/signin", status_code=303)
        if not annotator.is_admin:
            return _html(pages.message_page(annotator, "Not allowed", "This page is for admins."), 403)
        return _html(pages.admin_page(annotator, label_stats(store, cfg.demonstration_words)))


def _add_api(app: FastAPI, store: LabelStore, cfg: LabelingConfig) -> None:
    def signed_in(request: Request) -> Annotator:
        annotator = _who(request, store)
        if annotator is None:
            raise HTTPException(401, "sign in first", headers={"WWW-Authenticate": "Bearer"})
        return annotator

    def admin_only(annotator: Annotator = Depends(signed_in)) -> Annotator:
        if not annotator.is_admin:
            raise HTTPException(403, "admins only")
        return annotator

    def progress_json(annotator: Annotator) -> dict:
        progress = store.progress(annotator)
        return {"done": progress.done, "assigned": progress.assigned}

    def next_json(annotator: Annotator) -> dict:
        progress = store.progress(annotator)
        assignment = store.next_assignment(annotator)
        return {
            "assignment": _assignment_json(assignment, cfg) if assignment else None,
            "progress": {"done": progress.done, "assigned": progress.assigned},
            "tasks": _tasks_json(progress),
        }

    @app.get("/api/progress")
    def progress(annotator: Annotator = Depends(signed_in)) -> dict:
        return progress_json(annotator)

    @app.get("/api/next")
    def next_item(annotator: Annotator = Depends(signed_in)) -> dict:
        return next_json(annotator)

    @app.get("/api/assignments/{assignment_id}")
    def read_assignment(assignment_id: int, annotator: Annotator = Depends(signed_in)) -> dict:
        return _assignment_json(_call(store.assignment, annotator, assignment_id), cfg)

    @app.post("/api/assignments/{assignment_id}/label")
    def submit_label(assignment_id: int, body: LabelBody, annotator: Annotator = Depends(signed_in)) -> dict:
        _call(store.save_label, annotator, assignment_id, body.ranking, body.flags)
        return {"ok": True, "progress": progress_json(annotator)}

    @app.post("/api/assignments/{assignment_id}/rating")
    def submit_rating(assignment_id: int, body: RatingBody, annotator: Annotator = Depends(signed_in)) -> dict:
        _call(store.save_rating, annotator, assignment_id, body.scores, body.comments, body.flags, cfg.max_text_chars)
        return {"ok": True, "progress": progress_json(annotator)}

    @app.post("/api/assignments/{assignment_id}/demonstration")
    def submit_demonstration(assignment_id: int, body: DemonstrationBody, annotator: Annotator = Depends(signed_in)) -> dict:
        _call(store.save_demonstration, annotator, assignment_id, body.text, cfg.max_text_chars)
        return {"ok": True, "progress": progress_json(annotator)}

    @app.post("/api/assignments/{assignment_id}/skip")
    def skip(assignment_id: int, body: SkipBody, annotator: Annotator = Depends(signed_in)) -> dict:
        _call(store.save_label, annotator, assignment_id, None, body.flags)
        return {"ok": True, "progress": progress_json(annotator)}

    @app.get("/api/admin/stats")
    def stats(annotator: Annotator = Depends(admin_only)) -> JSONResponse:
        return JSONResponse(label_stats(store, cfg.demonstration_words).as_dict())


def _call(function, *args):
    """Run a store call, turning its refusals into HTTP answers."""
    try:
        return function(*args)
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except AlreadyLabelled as exc:
        raise HTTPException(409, str(exc)) from None
    except InvalidLabel as exc:
        raise HTTPException(422, str(exc)) from None


def _assignment_json(assignment: Assignment, cfg: LabelingConfig) -> dict:
    """The item as the page shows it; ``completions`` of a demonstration is its draft (or empty)."""
    out = {
        "id": assignment.id,
        "task": assignment.task,
        "labelled": assignment.labelled,
        "prompt": {"id": assignment.prompt.id, "text": assignment.prompt.text},
        "completions": [{"id": c.id, "text": c.text} for c in assignment.completions],
    }
    if assignment.task == "rating":
        out["scale"] = list(LIKERT)
    if assignment.task == "demonstration":
        out["words"] = list(cfg.demonstration_words)
        out["max_chars"] = cfg.max_text_chars
    return out


def _tasks_json(progress: Progress) -> dict:
    return {task: {"done": done, "assigned": assigned} for task, (done, assigned) in progress.by_task.items()}
