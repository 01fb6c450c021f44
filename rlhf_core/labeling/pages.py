"""HTML of the labelling app, rendered on the server.

Every string that did not come from this file - prompts, completions (model
written), annotator names - goes through :func:`esc`, so markup in a completion
is shown as text.  Pages carry no inline script or style: the Content-Security-
Policy set by the app allows only ``/static`` files.
"""

from __future__ import annotations

from html import escape

from rlhf_core.labeling.stats import LabelStats
from rlhf_core.labeling.store import FLAGS, Annotator, Assignment, Progress


def esc(value: object) -> str:
    return escape(str(value), quote=True)


def document(title: str, body: str, *, script: bool = False) -> str:
    tag = '<script src="/static/app.js" defer></script>' if script else ""
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
    admin = '<a href="/admin">Admin</a>' if annotator.is_admin else ""
    return f"""
<header class="bar">
  <a class="brand" href="/label">Preference labelling</a>
  {meter}
  <span class="who">{esc(annotator.name)}</span>{admin}
  <form method="post" action="/signout"><button type="submit">Sign out</button></form>
</header>"""


def label_page(annotator: Annotator, progress: Progress, assignment: Assignment | None) -> str:
    if assignment is None:
        text = (
            "Every item assigned to you is labelled. Thank you!"
            if progress.assigned
            else "No items are assigned to you yet."
        )
        body = f'{_top_bar(annotator, progress)}<main class="message"><h1>Nothing to label</h1><p>{esc(text)}</p></main>'
        return document("Nothing to label", body)
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
    return document("Label", body, script=True)


def _completion_card(number: int, completion_id: str, text: str) -> str:
    flags = "".join(
        f'<button type="button" class="flag" data-flag="{flag}" aria-pressed="false">{flag.capitalize()}</button>'
        for flag in FLAGS
    )
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


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _number(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)
