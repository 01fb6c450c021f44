"""The labelling app in a real headless Chromium: sign in, survive a cross-origin form post, rank by click,
keyboard and drag, tie, flag, skip, watch progress, then find the labels in ``rlhf label export``."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_core.preferences import PreferenceBundle
from tests.test_labeling_app import XSS, free_port, live_server, rlhf_in_process, set_up_project

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

        # Item 2: skipped from the keyboard.
        page.keyboard.press("s")
        expect(progress).to_have_text("Done 2 of 3")

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
