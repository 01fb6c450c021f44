"""The labelling app in a real headless Chromium: sign in, survive a cross-origin form post, rank by click,
keyboard and drag, tie, flag, skip, watch progress, then find the labels in ``rlhf label export``; then a
demonstration session (edit a draft against the live word count) and a rating session, each ending in the export."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest

from rlhf_core.preferences import PreferenceBundle
from tests.test_labeling_app import END_TEXTAREA, XSS, free_port, live_server, rlhf_in_process, set_up_project, set_up_tasks

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-sync",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (apt-get install chromium)"),
]


def card(page, key: int):
    return page.locator(f'article.completion[data-key="{key}"]')


def completion_id(page, key: int) -> str:
    return card(page, key).get_attribute("data-id")


def test_label_in_a_real_browser_and_export(work_env, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    tokens = set_up_project(work_env, prompts=3, annotators=["ann"], xss=True)
    dialogs: list[str] = []
    with live_server(work_env) as (url, _), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        errors: list[str] = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)

        page.goto(f"{url}/label")
        expect(page).to_have_url(f"{url}/signin")
        page.fill("#token", tokens["ann"])
        page.click("button[type=submit]")
        expect(page).to_have_url(f"{url}/label")
        progress = page.locator("#progress")
        expect(progress).to_have_text("Done 0 of 3")

        # A page of another local program (same site, other port) posts a form to the app: the browser sends the
        # SameSite=Strict cookie along, the origin check refuses the request, and the annotator stays signed in.
        foreign = f"http://127.0.0.1:{free_port()}/"
        attacker = context.new_page()
        attacker.route(foreign, lambda route: route.fulfill(content_type="text/html", body=(
            f'<form method="post" action="{url}/signout"><button id="go">go</button></form>')))
        attacker.goto(foreign)
        with attacker.expect_navigation():
            attacker.click("#go")
        assert "cross-origin request refused" in attacker.content()
        attacker.close()
        page.reload()
        expect(progress).to_have_text("Done 0 of 3")

        # Item 1: clicks, a tie, a flag; one completion carries a script that must show as text.
        expect(page.get_by_text(XSS, exact=False).first).to_be_visible()
        first = [completion_id(page, key) for key in (1, 2, 3, 4)]
        card(page, 2).locator(".text").click()
        card(page, 1).locator(".text").click()
        page.click("#tie")
        card(page, 3).locator(".text").click()
        card(page, 4).locator(".text").click()
        card(page, 4).locator('.flag[data-flag="unsafe"]').click()
        expect(card(page, 1).locator(".rank")).to_have_text("Rank 1 (tie)")
        expect(card(page, 4)).to_have_class("completion ranked flagged")
        page.screenshot(path=str(tmp_path / "labelling_page.png"), full_page=True)
        page.click("#submit")
        expect(progress).to_have_text("Done 1 of 3")
        page.wait_for_load_state("load")  # the next item's page shows its progress before its script listens for keys

        # Item 2: skipped from the keyboard.
        page.keyboard.press("s")
        expect(progress).to_have_text("Done 2 of 3")
        page.wait_for_load_state("load")

        # Item 3: ranked from the keyboard, then the last entry dragged to the top.
        third = [completion_id(page, key) for key in (1, 2, 3, 4)]
        for key in "1234":
            page.keyboard.press(key)
        page.drag_and_drop("#ranking li:nth-child(4)", "#ranking li:nth-child(1)")
        expect(page.locator("#ranking li").first).to_have_text("1. #4")
        page.keyboard.press("Enter")
        expect(progress).to_have_text("Done 3 of 3")
        expect(page.get_by_role("heading", name="Nothing to label")).to_be_visible()
        browser.close()

    assert dialogs == [], "a script from a completion ran"
    assert errors == []
    print(f"screenshot: {tmp_path / 'labelling_page.png'}")

    rlhf_in_process("label", "export")
    bundle = PreferenceBundle.read(work_env / "data" / "labels")
    assert not bundle.rejects
    rankings = sorted(bundle.rankings, key=lambda r: r.created_at)
    assert [(r.annotator_id, r.source) for r in rankings] == [("ann", "human"), ("ann", "human")]
    assert rankings[0].completion_ids == [first[1], first[0], first[2], first[3]]
    assert rankings[0].ranks == [1, 1, 3, 4]
    assert rankings[0].flags == {first[3]: "unsafe"}
    assert rankings[1].completion_ids == [third[3], third[0], third[1], third[2]]
    assert rankings[1].ranks == [1, 2, 3, 4]
    assert len(bundle.prompts) == 2 and len(bundle.completions) == 8


@contextmanager
def signed_in_page(root: Path, token: str):
    """A Chromium page signed in to a live server; yields (page, base url, dialogs seen, console errors)."""
    from playwright.sync_api import expect, sync_playwright

    dialogs: list[str] = []
    errors: list[str] = []
    with live_server(root) as (url, _), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.goto(f"{url}/signin")
        page.fill("#token", token)
        page.click("button[type=submit]")
        expect(page).to_have_url(f"{url}/label")
        try:
            yield page, url, dialogs, errors
        finally:
            browser.close()


def test_a_demonstration_session_in_a_real_browser_ends_in_the_sft_export(work_env, tmp_path):
    from playwright.sync_api import expect

    tokens = set_up_tasks(work_env, ["ann"], tasks=("demonstration",))
    with signed_in_page(work_env, tokens["ann"]) as (page, url, dialogs, errors):
        progress = page.locator("#progress")
        expect(progress).to_have_text("Done 0 of 2")
        answer, count = page.locator("#answer"), page.locator("#word-count")
        prompts = []
        for _ in range(2):
            draft = page.locator("#draft-text").inner_text()
            prompts.append(page.locator(".prompt .text").inner_text())
            expect(answer).to_have_value(draft)  # the answer box starts from the draft, markup and all, as text
            if END_TEXTAREA in draft:
                break
            page.click("#skip")
            expect(progress).to_have_text("Done 1 of 2")
        assert END_TEXTAREA in prompts[-1]
        expect(count).to_have_text(f"{len(draft.split())} words (guide 15–60): {15 - len(draft.split())} below the guide")
        expect(count).to_have_class("word-count outside")
        written = ("Use a closing tag only where the markup needs one, and escape user text before it reaches the"
                   " page, so that a stray tag shows as text and never runs.")
        page.click("#clear")
        expect(page.locator("#submit")).to_be_disabled()
        answer.press_sequentially(written[:40])
        answer.fill(written)
        expect(count).to_have_text(f"{len(written.split())} words (guide 15–60): within the guide")
        expect(count).to_have_class("word-count")
        page.click("#restore")
        expect(answer).to_have_value(draft)
        answer.fill(written)
        page.screenshot(path=str(tmp_path / "demonstration_page.png"), full_page=True)
        answer.press("Control+Enter")
        if len(prompts) == 1:  # the item with markup came first: the other one is still open
            expect(progress).to_have_text("Done 1 of 2")
            page.click("#skip")
        expect(progress).to_have_text("Done 2 of 2")
        expect(page.get_by_role("heading", name="Nothing to label")).to_be_visible()
    assert dialogs == [] and errors == []

    assert "1 demonstrations and 0 ratings (1 skips not exported)" in rlhf_in_process("label", "export")
    out = work_env / "data" / "labels"
    [row] = [json.loads(line) for line in (out / "demonstrations.jsonl").read_text().splitlines()]
    [chat] = [json.loads(line) for line in (out / "demonstrations_messages.jsonl").read_text().splitlines()]
    assert (row["prompt"], row["completion"], row["annotator_id"], row["draft_id"]) == (prompts[-1], written, "ann", "d0-draft")
    assert chat["messages"] == [{"role": "user", "content": prompts[-1]}, {"role": "assistant", "content": written}]


def test_a_rating_session_in_a_real_browser_ends_in_the_ratings_export(work_env, tmp_path):
    from playwright.sync_api import expect

    from rlhf_core.importers import load_preferences

    tokens = set_up_tasks(work_env, ["ann"], tasks=("rating",))
    with signed_in_page(work_env, tokens["ann"]) as (page, url, dialogs, errors):
        progress = page.locator("#progress")
        expect(progress).to_have_text("Done 0 of 2")
        expect(page.get_by_text(XSS, exact=False).first).to_be_visible()
        submit = page.locator("#submit")
        ids = [completion_id(page, key) for key in (1, 2, 3)]
        for key, score in ((1, 6), (2, 2)):
            card(page, key).locator(f'input[value="{score}"]').check()
        expect(submit).to_be_disabled()
        expect(page.locator("#remaining")).to_have_text("Still to score: #3")
        card(page, 3).locator('label.score:has(input[value="2"])').click()
        card(page, 2).locator('.flag[data-flag="nonsense"]').click()
        card(page, 1).locator("textarea").fill("Clear, and it stops.")
        page.keyboard.press("s")  # typed into the comment: a letter, not a skip
        expect(progress).to_have_text("Done 0 of 2")
        expect(submit).to_be_enabled()
        page.screenshot(path=str(tmp_path / "rating_page.png"), full_page=True)
        submit.click()
        expect(progress).to_have_text("Done 1 of 2")
        page.wait_for_load_state("load")  # shown before the page's script listens for keys
        page.locator("h2").first.click()  # focus outside any comment box
        page.keyboard.press("s")
        expect(progress).to_have_text("Done 2 of 2")
    assert dialogs == [] and errors == []

    assert "0 demonstrations and 1 ratings (1 skips not exported)" in rlhf_in_process("label", "export")
    ratings = work_env / "data" / "labels" / "ratings.jsonl"
    [row] = [json.loads(line) for line in ratings.read_text().splitlines()]
    got = {c["id"]: (c["overall_score"], c["comment"], c["flag"]) for c in row["completions"]}
    assert got == {ids[0]: (6, "Clear, and it stops.s", None), ids[1]: (2, None, "nonsense"), ids[2]: (2, None, None)}
    [ranking] = load_preferences(ratings, "ratings").rankings
    assert ranking.annotator_id == "ann" and ranking.ratings == [6, 2, 2] and ranking.ranks == [1, 2, 2]
