"""The README's judge example: make a study, answer it with a scripted rater in headless
Chromium (screenshots of the three tasks on the way), and report. The answers are a seeded
random script's, not people's: the report shows the pipeline, not a finding.

    .venv/bin/python tools/judge_walkthrough.py --sae RUN --activations STORE --out DIR
        [--images docs/images/judge] [--latents 30]
"""

from __future__ import annotations

import argparse
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from saelab.cli import main as saelab


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sae", required=True)
    parser.add_argument("--activations", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=Path, default=Path("docs/images/judge"))
    parser.add_argument("--latents", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=20_000)
    args = parser.parse_args()
    study = args.out / "study"
    assert saelab(["judge", "new", "--sae", args.sae, "--activations", args.activations,
                   "--out", str(study), "--latents", str(args.latents), "--tokens",
                   str(args.tokens)]) == 0
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "saelab", "judge", "serve", str(study),
                               "--port", str(port)])
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        answer_all(f"http://127.0.0.1:{port}/", args.images)
    finally:
        server.terminate()
        server.wait()
    assert saelab(["judge", "report", str(study), "--out", str(args.out / "report")]) == 0


def answer_all(url: str, images: Path) -> None:
    from playwright.sync_api import sync_playwright

    rng = random.Random(0)
    images.mkdir(parents=True, exist_ok=True)
    shot: set[str] = set()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or
                                    "/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(url)
        page.fill("#name", "script")
        page.keyboard.press("Enter")
        page.wait_for_selector("#instructions:not(.hidden)")
        page.screenshot(path=str(images / "instructions.png"))
        page.keyboard.press("Enter")
        while True:
            page.wait_for_selector("#trial:not(.hidden), #done:not(.hidden)")
            if page.is_visible("#done"):
                break
            task = ("rate" if page.locator("#content textarea").count() else
                    "pair" if page.locator("#content .cols").count() else "intruder")
            if task not in shot:
                page.screenshot(path=str(images / f"{task}.png"), full_page=False)
                shot.add(task)
            before = page.text_content("#count")
            key = {"rate": rng.choice("ymn"), "pair": rng.choice("als"),
                   "intruder": str(rng.randint(1, 5))}[task]
            page.keyboard.press(key)
            page.wait_for_function(
                "b => document.querySelector('#count').textContent !== b || "
                "!document.querySelector('#done').classList.contains('hidden')", arg=before)
        browser.close()


if __name__ == "__main__":
    main()
