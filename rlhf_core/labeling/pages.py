"""HTML of the labelling app, rendered on the server.

Every string that did not come from this file - prompts, completions and
drafts (model written), annotator names - goes through :func:`esc`, so markup
in a completion is shown as text (inside a ``<textarea>`` too, where an
unescaped ``</textarea>`` would end the field).  Pages carry no inline script
or style: the Content-Security-Policy set by the app allows only ``/static``
files, one script per task.
"""

from __future__ import annotations

from html import escape

from rlhf_core.config import LabelingConfig
from rlhf_core.labeling.stats import LabelStats
from rlhf_core.labeling.store import FLAGS, LIKERT, Annotator, Assignment, Progress

#: The scripts that drive each task's page (submit.js: the save-and-go-on request the newer tasks share).
SCRIPTS = {"ranking": ("app.js",), "rating": ("submit.js", "rating.js"), "demonstration": ("submit.js", "demonstration.js")}

#: The Likert scale's end points, as annotators read them.
SCALE_ENDS = ("very bad", "excellent")


def esc(value: object) -> str:
    return escape(str(value), quote=True)


def document(title: str, body: str, *, scripts: tuple[str, ...] = ()) -> str:
    tag = "".join(f'<script src="/static/{name}" defer></script>' for name in scripts)
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{esc(title)}</title><link rel="icon" href="/static/favicon.svg" type="image/svg+xml">'
        f'<link rel="stylesheet" href="/static/style.css">{tag}</head>'
        f"<body>{body}</body></html>"
    )


def signin_page(error: str | None = None) -> str:
    message = f'<p class="error" role="alert">{esc(error)}</p>' if error else ""
    body = f"""
<main class="signin">
  <h1>Preference labelling</h1>
  <form method="post" action="/signin">
    <label for="token">Your annotator token</label>
    <input id="token" name="token" type="password" autocomplete="off" required autofocus>
    <button type="submit" class="primary">Sign in</button>
  </form>
  {message}
  <p class="hint">Ask the project lead for a token (<code>rlhf label add-annotator NAME</code>).</p>
</main>"""
    return document("Sign in", body)


def message_page(annotator: Annotator | None, title: str, text: str) -> str:
    return document(title, f'{_top_bar(annotator)}<main class="message"><h1>{esc(title)}</h1><p>{esc(text)}</p></main>')


def _top_bar(annotator: Annotator | None, progress: Progress | None = None) -> str:
    if annotator is None:
        return ""
    meter = ""
    if progress is not None:
        meter = (
            f'<span id="progress" data-done="{progress.done}" data-assigned="{progress.assigned}">'
            f"Done {progress.done} of {progress.assigned}</span>"
            f'<progress value="{progress.done}" max="{max(progress.assigned, 1)}"></progress>'
        )
        if len(progress.by_task) > 1:
            parts = ", ".join(f"{task} {done}/{assigned}" for task, (done, assigned) in progress.by_task.items())
            meter += f'<span id="task-progress" class="hint">{esc(parts)}</span>'

    admin = '<a href="/admin">Admin</a>' if annotator.is_admin else ""
    return f"""
<header class="bar">
  <a class="brand" href="/label">Preference labelling</a>
  {meter}
  <span class="who">{esc(annotator.name)}</span>{admin}
  <form method="post" action="/signout"><button type="submit">Sign out</button></form>
</header>"""


def label_page(annotator: Annotator, progress: Progress, assignment: Assignment | None, cfg: LabelingConfig) -> str:
    if assignment is None:
        text = (
            "Every item assigned to you is labelled. Thank you!"
            if progress.assigned
            else "No items are assigned to you yet."
        )
        body = f'{_top_bar(annotator, progress)}<main class="message"><h1>Nothing to label</h1><p>{esc(text)}</p></main>'
        return document("Nothing to label", body)
    if assignment.task == "rating":
        return _rating_page(annotator, progress, assignment, cfg)
    if assignment.task == "demonstration":
        return _demonstration_page(annotator, progress, assignment, cfg)
    cards = "\n".join(_completion_card(number, c.id, c.text) for number, c in enumerate(assignment.completions, 1))
    body = f"""
{_top_bar(annotator, progress)}
<main id="item" class="item" data-assignment="{assignment.id}">
  <div class="work">
    <section class="prompt" aria-label="Prompt">
      <h2>Prompt</h2>
      <div class="text">{esc(assignment.prompt.text)}</div>
    </section>
    <p class="help">Click the completions from <strong>best to worst</strong>, or press their numbers.
      <kbd>t</kbd> ties the last pick with the one before, <kbd>Backspace</kbd> undoes it,
      <kbd>Enter</kbd> submits, <kbd>s</kbd> skips the item. Drag entries of “Your ranking” to reorder.</p>
    <section class="completions" aria-label="Completions">
{cards}
    </section>
  </div>
  <aside class="panel" aria-label="Your ranking">
    <h2>Your ranking</h2>
    <ol id="ranking" class="ranking"></ol>
    <p id="remaining" class="hint"></p>
    <div class="controls">
      <button type="button" id="tie">Tie with previous <kbd>t</kbd></button>
      <button type="button" id="undo">Undo <kbd>⌫</kbd></button>
      <button type="button" id="reset">Reset</button>
    </div>
    <div class="controls">
      <button type="button" id="submit" class="primary" disabled>Submit <kbd>Enter</kbd></button>
      <button type="button" id="skip">Skip item <kbd>s</kbd></button>
    </div>
    <p id="status" role="status" class="status"></p>
  </aside>
</main>"""
    return document("Label", body, scripts=SCRIPTS["ranking"])


def _prompt_section(assignment: Assignment) -> str:
    return f"""<section class="prompt" aria-label="Prompt">
      <h2>Prompt</h2>
      <div class="text">{esc(assignment.prompt.text)}</div>
    </section>"""


def _rating_page(annotator: Annotator, progress: Progress, assignment: Assignment, cfg: LabelingConfig) -> str:
    cards = "\n".join(
        _rating_card(number, c.id, c.text, cfg.max_text_chars) for number, c in enumerate(assignment.completions, 1)
    )
    low, high = LIKERT
    body = f"""
{_top_bar(annotator, progress)}
<main id="item" class="item rating" data-assignment="{assignment.id}" data-task="rating">
  <div class="work">
    {_prompt_section(assignment)}
    <p class="help">Score <strong>each</strong> completion on its own, from {low} ({SCALE_ENDS[0]}) to {high}
      ({SCALE_ENDS[1]}): is it helpful, correct, complete and on topic? A comment is optional.
      <kbd>s</kbd> (outside a comment) skips the item.</p>
    <section class="completions" aria-label="Completions">
{cards}
    </section>
  </div>
  <aside class="panel" aria-label="Your ratings">
    <h2>Your ratings</h2>
    <p id="remaining" class="hint"></p>
    <div class="controls">
      <button type="button" id="submit" class="primary" disabled>Submit <kbd>Ctrl+Enter</kbd></button>
      <button type="button" id="skip">Skip item <kbd>s</kbd></button>
    </div>
    <p id="status" role="status" class="status"></p>
  </aside>
</main>"""
    return document("Rate", body, scripts=SCRIPTS["rating"])


def _rating_card(number: int, completion_id: str, text: str, max_chars: int) -> str:
    low, high = LIKERT
    name = f"score-{number}"
    choices = "".join(
        f'<label class="score"><input type="radio" name="{name}" value="{value}"><span>{value}</span></label>'
        for value in range(low, high + 1)
    )
    return f"""      <article class="completion rated-card" data-id="{esc(completion_id)}" data-key="{number}">
        <header><span class="key">{number}</span><span class="flags">{_flag_buttons()}</span></header>
        <div class="text">{esc(text)}</div>
        <fieldset class="scale"><legend>Score {low}–{high}</legend>
          <span class="end">{low} {SCALE_ENDS[0]}</span>{choices}<span class="end">{high} {SCALE_ENDS[1]}</span>
        </fieldset>
        <label class="comment">Comment (optional)
          <textarea rows="2" maxlength="{max_chars}" data-comment="{esc(completion_id)}"></textarea></label>
      </article>"""


def _demonstration_page(annotator: Annotator, progress: Progress, assignment: Assignment, cfg: LabelingConfig) -> str:
    low, high = cfg.demonstration_words
    draft = assignment.completions[0] if assignment.completions else None
    draft_panel, start_text, draft_help = "", "", ""
    if draft is not None:
        draft_panel = f"""<section class="draft" aria-label="Model draft" data-id="{esc(draft.id)}">
      <h2>Model draft</h2>
      <div class="text" id="draft-text">{esc(draft.text)}</div>
    </section>"""
        start_text = draft.text
        draft_help = " The answer box starts from the model's draft: keep what is good, fix or rewrite the rest."
    body = f"""
{_top_bar(annotator, progress)}
<main id="item" class="item demonstration" data-assignment="{assignment.id}" data-task="demonstration"
  data-min-words="{low}" data-max-words="{high}">
  <div class="work">
    <div class="sources">
    {_prompt_section(assignment)}
    {draft_panel}
    </div>
    <p class="help">Write the answer you would want the assistant to give: helpful, correct, complete, on topic,
      and ending properly. Aim for {low}–{high} words.{draft_help}</p>
    <label for="answer" class="answer-label">Your answer</label>
    <textarea id="answer" rows="8" maxlength="{cfg.max_text_chars}" spellcheck="true">
{esc(start_text)}</textarea>
    <p id="word-count" class="word-count" aria-live="polite"></p>
  </div>
  <aside class="panel" aria-label="Your answer">
    <h2>Length guide</h2>
    <p class="hint">{low}–{high} words</p>
    <div class="controls">
      {'<button type="button" id="restore">Back to the draft</button>' if draft else ""}
      <button type="button" id="clear">Clear</button>
    </div>
    <div class="controls">
      <button type="button" id="submit" class="primary" disabled>Submit <kbd>Ctrl+Enter</kbd></button>
      <button type="button" id="skip">Skip item</button>
    </div>
    <p id="status" role="status" class="status"></p>
  </aside>
</main>"""
    return document("Write", body, scripts=SCRIPTS["demonstration"])


def _flag_buttons() -> str:
    return "".join(
        f'<button type="button" class="flag" data-flag="{flag}" aria-pressed="false">{flag.capitalize()}</button>'
        for flag in FLAGS
    )


def _completion_card(number: int, completion_id: str, text: str) -> str:
    flags = _flag_buttons()
    return f"""      <article class="completion" data-id="{esc(completion_id)}" data-key="{number}">
        <header><span class="key">{number}</span><span class="rank" aria-live="polite"></span>
          <span class="flags">{flags}</span></header>
        <div class="text">{esc(text)}</div>
      </article>"""


def admin_page(annotator: Annotator, stats: LabelStats) -> str:
    rows = "\n".join(
        "<tr>"
        f"<td>{esc(a.name)}</td><td>{a.done} / {a.assigned}</td><td>{a.skipped}</td><td>{a.flagged}</td>"
        f"<td>{a.last_hour}</td><td>{_number(a.per_active_hour, '.1f')}</td>"
        f"<td>{_percent(a.agreement_with_others)}</td><td>{_percent(a.agreement_with_gold)}</td>"
        "</tr>"
        for a in stats.annotators
    )
    body = f"""
{_top_bar(annotator)}
<main class="admin">
  <h1>Labelling overview</h1>
  <dl class="figures">
    <div><dt>Items</dt><dd>{stats.items} ({stats.gold_items} gold)</dd></div>
    <div><dt>Labels</dt><dd>{stats.labels} ({stats.skipped} skipped)</dd></div>
    <div><dt>Labels in the last hour</dt><dd>{stats.labels_last_hour}</dd></div>
    <div><dt>Pairwise agreement</dt><dd id="agreement">{_percent(stats.pairwise_agreement)}</dd>
      <dd class="hint">{stats.agreement_comparisons} comparisons</dd></div>
    <div><dt>Krippendorff's α (ordinal)</dt><dd id="alpha">{_number(stats.krippendorff_alpha, '.3f')}</dd></div>
  </dl>
{_task_tables(stats)}
  <table>
    <thead><tr><th>Annotator</th><th>Done</th><th>Skipped</th><th>Flags</th><th>Last hour</th>
      <th>Per active hour</th><th>Agreement with others</th><th>Agreement with gold</th></tr></thead>
    <tbody>
{rows}
    </tbody>
  </table>
  <p class="hint">Agreement: share of completion pairs two annotators order alike (a tie against an order counts
    half). InstructGPT's labelers agreed on 72.6 ± 1.5 %.</p>
</main>"""
    return document("Admin", body)


def _task_tables(stats: LabelStats) -> str:
    rows = "\n".join(
        f"<tr><td>{esc(t.task)}</td><td>{t.items}</td><td>{t.labels}</td><td>{t.skipped}</td><td>{t.last_hour}</td>"
        f"<td>{_number(t.per_active_hour, '.1f')}</td></tr>"
        for t in stats.tasks
    )
    r, d = stats.rating, stats.demonstration
    low, high = d.guide_words
    return f"""  <h2>Per task</h2>
  <table id="tasks">
    <thead><tr><th>Task</th><th>Items</th><th>Labels</th><th>Skipped</th><th>Last hour</th><th>Per active hour</th></tr></thead>
    <tbody>
{rows}
    </tbody>
  </table>
  <dl class="figures" id="rating-figures">
    <div><dt>Ratings</dt><dd>{r.ratings}</dd><dd class="hint">{r.commented} comments</dd></div>
    <div><dt>Mean score</dt><dd>{_number(r.mean_score, '.2f')}</dd></div>
    <div><dt>Krippendorff's α (interval)</dt><dd id="rating-alpha">{_number(r.krippendorff_alpha_interval, '.3f')}</dd>
      <dd class="hint">{r.pairable_units} completions rated twice or more</dd></div>
  </dl>
  <dl class="figures" id="demonstration-figures">
    <div><dt>Demonstrations</dt><dd>{d.demonstrations}</dd><dd class="hint">{d.with_draft} from a draft,
      {d.unchanged_drafts} unchanged</dd></div>
    <div><dt>Words (mean / median)</dt><dd>{_number(d.mean_words, '.1f')} / {_number(d.median_words, '.1f')}</dd></div>
    <div><dt>Within {low}–{high} words</dt><dd>{_percent(d.within_guide)}</dd></div>
    <div><dt>Edit distance from the draft</dt><dd id="edit-distance">{_number(d.mean_edit_distance, '.1f')} words</dd>
      <dd class="hint">{_percent(d.mean_relative_edit_distance)} of the longer text</dd></div>
  </dl>"""


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _number(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)
