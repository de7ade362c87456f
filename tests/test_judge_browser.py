"""`saelab judge serve` in a real browser: Debian's Chromium driven by Playwright (the pip
package, pointed at /usr/bin/chromium; `make` installs both). A scripted rater answers a
whole study with keyboard and mouse, reloads half-way, undoes an answer, works beside a
second rater; the database then holds exactly what was clicked; no response names a coder;
hostile corpus text is shown as text and runs nothing; a server killed with SIGKILL loses no
answer and the study resumes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import saelab as sl
from saelab.cli import main
from saelab.formats import write_sae
from saelab.judge import DATABASE, create_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CODER_WORDS = re.compile(r"encoder|nn-gp|\bgp\b|pursuit|refit")
HOSTILE = ['<img src=x onerror="window.__pwned=1">', "<script>window.__pwned=1</script>",
           '"><svg onload=window.__pwned=1>']


@pytest.fixture(scope="module")
def study(tiny_model_dir, tmp_path_factory):
    """A small study (3 latents, 2 pair tokens: 14 trials) made from a corpus file holding
    hostile strings, with one token's text replaced by a whole hostile tag as well."""
    root = tmp_path_factory.mktemp("judge-web")
    corpus = root / "corpus.txt"
    lines = [f"Line {i}: the value {HOSTILE[i % 3]} is read and printed." for i in range(400)]
    corpus.write_text("\n".join(lines))
    sl.cache_activations(root / "acts", model=str(tiny_model_dir),
                         sites=("blocks.1.hook_resid_post",), corpus=str(corpus), tokens=2000,
                         context_size=32)
    store = sl.ActivationStore(root / "acts")
    sae = sl.saes.TopKSAE(store.d_model, 64, k=6, site=store.site,
                          model=store.model).init_random(seed=1)
    with torch.no_grad():
        sae.b_dec.copy_(store[:].mean(dim=0))
    write_sae(sae, root / "sae")
    out = root / "study"
    assert main(["judge", "new", "--sae", str(root / "sae"), "--activations",
                 str(root / "acts"), "--out", str(out), "--latents", "3", "--pairs", "2",
                 "--tokens", "1500", "--k", "4"]) == 0
    con = sqlite3.connect(out / DATABASE)
    trial, payload = con.execute("SELECT id, payload FROM trials WHERE task = 'rate' "
                                 "ORDER BY id LIMIT 1").fetchone()
    planted = json.loads(payload)
    planted["card"]["top"][0]["tokens"][0]["text"] = HOSTILE[0]
    con.execute("UPDATE trials SET payload = ? WHERE id = ?", (json.dumps(planted), trial))
    con.commit()
    con.close()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "saelab", "judge", "serve", str(folder),
                               "--port", str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return server
        except OSError:
            assert server.poll() is None, server.stderr.read().decode()
            time.sleep(0.1)
    raise AssertionError("the server did not start")


@pytest.fixture
def served(study, tmp_path):
    folder = tmp_path / "study"
    shutil.copytree(study, folder)
    port = free_port()
    server = start_server(folder, port)
    yield folder, port, server
    if server.poll() is None:
        server.kill()
    server.wait()


@pytest.fixture
def browser():
    assert Path(CHROMIUM).is_file(), "the browser tests need Debian's chromium: run make test"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def task_of(page) -> str:
    page.wait_for_selector("#trial:not(.hidden), #done:not(.hidden)")
    if page.is_visible("#done"):
        return "done"
    if page.locator("#content textarea").count():
        return "rate"
    return "pair" if page.locator("#content .cols").count() else "intruder"


def answer(page, i: int) -> tuple[str, dict]:
    """Answer the shown trial, by keyboard on even i and by mouse on odd i; return what
    was given, as the database should hold it."""
    task = task_of(page)
    before = page.text_content("#count")
    keyboard = i % 2 == 0
    if task == "rate":
        score = i % 3
        if i % 4 == 1:
            page.fill("#explanation", f"explained {i}")
        if keyboard:
            page.locator("body").press({2: "y", 1: "m", 0: "n"}[score])
        else:
            page.click(f"#content button:has-text('{['No', 'Maybe', 'Yes'][score]}')")
        given = {"score": score, **({"explanation": f"explained {i}"} if i % 4 == 1 else {})}
    elif task == "pair":
        choice = ("left", "right", "same")[i % 3]
        page.keyboard.press("3")  # high confidence
        if keyboard:
            page.keyboard.press({"left": "ArrowLeft", "right": "l", "same": "s"}[choice])
        else:
            label = {"left": "Left", "right": "Right", "same": "No difference"}[choice]
            page.click(f"#content .choices button:has-text('{label}')")
        given = {"choice": choice, "confidence": 3}
    else:
        choice = i % 5
        if keyboard:
            page.keyboard.press(str(choice + 1))
        else:
            page.click(f"#content .choices button:nth-child({choice + 1})")
        given = {"choice": choice}
    page.wait_for_function("b => document.querySelector('#count').textContent !== b "
                           "|| !document.querySelector('#done').classList.contains('hidden')",
                           arg=before)
    return task, given


def live_answers(folder: Path, rater: str) -> list[dict]:
    con = sqlite3.connect(folder / DATABASE)
    rows = con.execute("SELECT answer FROM answers WHERE rater = ? AND undone = 0 ORDER BY id",
                       (rater,)).fetchall()
    con.close()
    return [json.loads(r[0]) for r in rows]


def test_raters_answer_a_whole_study_in_chromium(served, browser, record_property):
    folder, port, _ = served
    url = f"http://127.0.0.1:{port}/"
    bodies: list[tuple[str, str, dict]] = []
    context = browser.new_context()
    page = context.new_page()
    page.on("response", lambda r: bodies.append((r.url, r.text(), r.headers)))
    page.goto(url)
    page.fill("#name", "ada")
    page.keyboard.press("Enter")
    page.wait_for_selector("#instructions:not(.hidden)")
    assert page.locator("#task-help li").count() == 3
    page.keyboard.press("Enter")
    other = browser.new_context().new_page()  # a second rater at the same time
    other.goto(url)
    other.fill("#name", "bob")
    other.click("#start")
    other.click("#begin")
    given, seconds = [], {}
    total = 14
    for i in range(total):
        if i == 6:  # reload half-way: the page comes back at the next trial
            page.reload()
            page.wait_for_selector("#trial:not(.hidden)")
            assert page.text_content("#count").startswith("6 of 14")
        if i == 9:  # undo the last answer: that trial comes back, answered again
            page.keyboard.press("u")
            page.wait_for_function("() => document.querySelector('#count').textContent"
                                   ".startsWith('8 of')")
            given.pop()
        task_of(page)
        assert page.evaluate("() => window.__pwned") is None  # nothing hostile ran
        assert page.evaluate("() => document.querySelectorAll('#content img, #content svg, "
                             "#content script').length") == 0
        t = time.perf_counter()
        task, g = answer(page, i)
        seconds.setdefault(task, []).append(time.perf_counter() - t)
        given.append(g)
        if i < 5:
            answer(other, i + 1)
    while task_of(page) != "done":  # the undo left one more trial
        given.append(answer(page, len(given))[1])
    assert page.text_content("#count") is not None
    assert live_answers(folder, "ada") == given
    assert len(live_answers(folder, "bob")) == 5
    con = sqlite3.connect(folder / DATABASE)
    undone = con.execute("SELECT COUNT(*) FROM answers WHERE undone = 1").fetchone()[0]
    assert undone == 1
    con.close()
    assert page.evaluate("() => window.__pwned") is None
    texts = " ".join(b for _, b, _ in bodies)
    assert "onerror" in texts and "window.__pwned" in texts  # served, as JSON text
    # blinding: no response (page, script, JSON, header, URL) names a coder
    for response_url, body, headers in bodies:
        body = re.sub(r"nonce-?[\"']?[=\w-]*", "", body)
        assert not CODER_WORDS.search(response_url), response_url
        assert not CODER_WORDS.search(body), (response_url, CODER_WORDS.search(body))
        assert not CODER_WORDS.search(json.dumps(headers)), headers
    record_property("seconds_per_trial", {t: round(sum(v) / len(v), 3)  # a lower bound
                                          for t, v in seconds.items()})


def test_a_killed_server_loses_no_answer(served, browser):
    folder, port, server = served
    page = browser.new_context().new_page()
    page.goto(f"http://127.0.0.1:{port}/")
    page.fill("#name", "ada")
    page.click("#start")
    page.click("#begin")
    given = [answer(page, i)[1] for i in range(5)]
    server.send_signal(signal.SIGKILL)
    server.wait()
    assert live_answers(folder, "ada") == given  # every acknowledged answer is on disk
    restarted = start_server(folder, port)
    try:
        page.reload()
        page.wait_for_selector("#trial:not(.hidden)")
        assert page.text_content("#count").startswith("5 of 14")
        given.append(answer(page, 5)[1])
        assert live_answers(folder, "ada") == given
    finally:
        restarted.kill()
        restarted.wait()


def test_every_route_is_blind_and_a_token_is_enforced(study, tmp_path):
    from starlette.testclient import TestClient

    folder = tmp_path / "study"
    shutil.copytree(study, folder)
    app = create_app(folder)
    client = TestClient(app)
    paths = {r.path for r in app.routes}
    assert paths == {"/", "/api/join", "/api/next", "/api/answer", "/api/undo"}
    seen = [client.get("/"), client.post("/api/join", json={"rater": "ada"}),
            client.get("/api/next", params={"rater": "ada"})]
    trial = seen[-1].json()
    seen.append(client.post("/api/answer", json={"rater": "ada", "trial": trial["trial"],
                                                 "answer": {"choice": 9}}))
    assert seen[-1].status_code == 400  # an answer of the wrong shape is refused
    good = {"rate": {"score": 1}, "pair": {"choice": "same", "confidence": 2},
            "intruder": {"choice": 0}}[trial["task"]]
    seen.append(client.post("/api/answer", json={"rater": "ada", "trial": trial["trial"],
                                                 "answer": good}))
    seen.append(client.post("/api/answer", json={"rater": "ada", "trial": trial["trial"],
                                                 "answer": good}))
    assert seen[-1].status_code == 400  # answered already
    seen.append(client.post("/api/undo", json={"rater": "ada"}))
    assert seen[-1].json()["trial"] == trial["trial"]
    for r in seen:
        text = re.sub(r"nonce-?[\"']?[=\w-]*", "", r.text)
        assert not CODER_WORDS.search(text) and not CODER_WORDS.search(str(r.headers))
    secured = TestClient(create_app(folder, token="s3cret"))
    assert secured.get("/").status_code == 401
    assert secured.get("/?token=wrong").status_code == 401
    assert secured.get("/?token=s3cret").status_code == 200
    assert secured.post("/api/join", json={"rater": "x"},
                        headers={"Authorization": "Bearer s3cret"}).status_code == 200
    with pytest.raises(sl.SaelabError, match="needs a token"):
        sl.judge.JudgeServeConfig(study=folder, host="0.0.0.0")
