"""The annotation page in a real browser: headless Chromium (Debian's package) driven by Playwright.

An annotator votes on pairs with the mouse and with the keys, meets a response holding an XSS payload
(shown as text, never run), reloads mid-way and continues on the same task, ranks a 3-way task with
keys, then the votes are exported and `rlhf train rm` runs 2 steps on the export. Screenshots of the
annotator view and the admin page are taken (docs/feedback-annotate.png, in docs/feedback.md, is one of them)."""

import json
import os
from pathlib import Path

import pytest

from rlhf_system.feedback.store import Store
from rlhf_system.feedback.tasks import Response, Task, write_tasks
from tests.integration.conftest import rlhf
from tests.integration.test_feedback import Server

pytestmark = pytest.mark.integration
CHROMIUM = "/usr/bin/chromium"
XSS = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def browser_or_skip():
    """Chromium and Playwright, or a skip that says what is missing; in CI (CI=true) a failure instead:
    launch/test.sh installs Debian's chromium, so CI must have it."""
    missing = [what for what, ok in (("Debian's chromium (apt-get install chromium)", os.path.exists(CHROMIUM)),
                                     ("playwright (the dev extra)", _has_playwright())) if not ok]
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests need {', '.join(missing)}")
        pytest.skip(f"needs {', '.join(missing)}")


def _has_playwright() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


def tasks() -> list[Task]:
    pair = lambda i, a, b, meta=None: Task(f"t{i}", f"Compute the sum.\n\n{i} + 1",
                                           [Response(a, "sft"), Response(b, "base")], meta or {})
    return [pair(0, "1", "I don't know."), pair(1, "2", "3"), pair(2, "3", XSS),
            Task("t3", "Order these replies to 'hi'.", [Response("hello!", "sft"), Response("hi", "base"),
                                                        Response("go away", "bad")]),
            pair(4, "5", "6"), pair(5, "6", "7")]


def test_an_annotator_in_chromium(tmp_path, small_model):
    browser_or_skip()
    from playwright.sync_api import expect, sync_playwright

    server = Server(tmp_path, write_tasks(tasks(), tmp_path / "tasks.jsonl"), ["alice"]).start()
    token = server.access()["alice"]
    shots = tmp_path / "shots"
    shots.mkdir()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{server.url}/annotate/alice#token={token}")

            def on_task(task_id: str):
                expect(page.locator("body")).to_have_attribute("data-task", task_id, timeout=15000)

            on_task("t0")
            expect(page.locator("#progress")).to_have_text("0 / 6 done")
            page.get_by_role("button", name="A clearly better").click()  # the mouse
            on_task("t1")
            page.select_option("#criterion-helpful", "B")
            page.keyboard.press("4")  # B slightly better, by key
            on_task("t2")
            # The XSS payload is on screen as text, and nothing of it ran.
            expect(page.locator(".card pre").filter(has_text="<script>")).to_have_count(1)
            assert page.evaluate("window.__xss") is None
            assert page.locator(".card img").count() == 0
            page.screenshot(path=str(shots / "annotate.png"))
            page.reload()  # mid-way: the same task comes back, in the same order
            on_task("t2")
            assert page.evaluate("window.__xss") is None
            page.keyboard.press("3")  # tie
            on_task("t3")
            expect(page.locator("#ranking")).to_be_visible()
            for key in ("2", "3", "1"):
                page.keyboard.press(key)
            expect(page.locator("#order li")).to_have_count(3)
            page.keyboard.press("Enter")
            on_task("t4")
            page.keyboard.press("0")  # both bad
            on_task("t5")
            page.get_by_role("button", name="B clearly better").click()
            expect(page.locator("#prompt")).to_contain_text("All done")
            expect(page.locator("#progress")).to_have_text("6 / 6 done")

            admin = browser.new_page()
            admin.goto(f"{server.url}/admin#token={json.loads(server.tokens.read_text())['admin']}")
            expect(admin.locator("#table tbody td").nth(1)).to_have_text("6")
            admin.screenshot(path=str(shots / "admin.png"))
            browser.close()
            assert not errors, errors
    finally:
        server.stop()

    votes = {v.task_id: v for v in Store(server.db).votes()}
    assert sorted(votes) == ["t0", "t1", "t2", "t3", "t4", "t5"]
    assert votes["t0"].choice == "A" and votes["t0"].strength == "clearly"
    assert votes["t1"].choice == "B" and votes["t1"].strength == "slightly"
    assert votes["t1"].criteria == {"helpful": votes["t1"].shown[1]}
    assert votes["t2"].choice == "tie" and votes["t4"].choice == "both_bad"
    shown = votes["t3"].shown  # keys 2, 3, 1: display positions 1, 2, 0, best first
    assert [votes["t3"].ranks[shown[p]] for p in (1, 2, 0)] == [1, 2, 3]
    assert all(v.seconds is not None and v.seconds >= 0 for v in votes.values())

    out = tmp_path / "prefs.jsonl"
    rlhf("feedback", "export", "--db", str(server.db), "--out", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 + 3  # t0, t1, t5 and the three pairs of the ranking
    run = tmp_path / "rm"
    rlhf("train", "rm", "--config", "configs/rm/tiny-cpu.yaml", f"model.path={small_model['policy']}",
         f"run_dir={run}", f"data.train=[{{path: {out}}}]", "data.eval=[]", "train.max_steps=2",
         "train.global_batch_size=2", "train.micro_batch_size=2", "logging.console=false",
         "checkpoint.export_hf=false")
    assert json.loads((run / "result.json").read_text())["steps"] == 2
    rlhf("feedback", "report", "--db", str(server.db), "--out", str(shots / "report"), "--bootstrap", "50")
    assert (shots / "report" / "models.png").stat().st_size > 2000  # the report's picture of the models
    assert (shots / "annotate.png").stat().st_size > 5000 and Path(shots / "admin.png").stat().st_size > 2000
