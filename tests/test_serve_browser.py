"""The web page of `cvr serve` in a real browser: a real server process over the demo gallery,
driven by Playwright with Debian's chromium (`apt-get install -y chromium`; skipped without it).

Search, a loaded thumbnail, the player seeking to the matching segment, metadata filters, an
error shown in the page, and no console errors or failed requests along the way."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = os.path.join(ROOT, "engine", "weights", "retrieval", "builtin")
CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no `chromium` on PATH: `apt-get install -y chromium` "
                                                          "(Debian) to run the browser tests")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The base URL of `cvr serve` over a 5-video demo gallery (mp4 files, thumbnails, anchors)."""
    pytest.importorskip("playwright.sync_api", reason="the `playwright` Python package is not installed")
    from engine.cli import main

    demo = str(tmp_path_factory.mktemp("serve_demo"))
    assert main(["demo", "--out", demo, "--videos", "30", "--quiet"]) == 0
    port = _free_port()
    log_path = os.path.join(demo, "serve.log")
    argv = [sys.executable, "-m", "engine.cli", "serve", "--gallery", os.path.join(demo, "gallery"),
            "--checkpoint", CHECKPOINT, "--anchor-cache", os.path.join(demo, "anchor_cache"), "--port", str(port)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"cvr serve exited {process.returncode}: {open(log_path).read()[-2000:]}")
            try:
                if _get_json(base + "/readyz")["videos"] > 0:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"cvr serve not ready within 120 s: {open(log_path).read()[-2000:]}")
            time.sleep(0.25)
        yield base
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless=new"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    """A fresh page on `/`, with every console error, page error and failed request collected in
    `page.problems` (a request that fails by answering >= 400 is one too)."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page.problems = []
    page.on("console", lambda message: message.type == "error" and page.problems.append(f"console: {message.text}"))
    page.on("pageerror", lambda error: page.problems.append(f"page error: {error}"))
    page.on("requestfailed", lambda request: page.problems.append(
        f"request failed: {request.url} ({request.failure})"))
    page.on("response", lambda response: response.status >= 400 and page.problems.append(
        f"HTTP {response.status}: {response.url}"))
    page.goto(server + "/")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('videos')")
    yield page
    context.close()


def _search(page, query: str, filters: str = "") -> dict:
    """Type a query (and filters), press Enter; the API's answer the page received."""
    page.fill("#query", query)
    page.fill("#filters", filters)
    with page.expect_response("**/v1/search") as answer:
        page.press("#query", "Enter")
    page.wait_for_function("() => !document.getElementById('results').hasAttribute('aria-busy')")
    return answer.value.json()


def test_search_shows_hits_and_the_player_seeks_to_the_segment(page, server, tmp_path):
    videos = _get_json(server + "/readyz")["videos"]
    assert page.text_content("#status").startswith(f"{videos} videos")
    answer = _search(page, "a red circle")
    hits = answer["results"][0]["hits"]
    assert len(hits) == min(10, videos)  # k 10 capped to the gallery's size
    cards = page.locator(".hit")
    assert cards.count() == len(hits)
    assert cards.first.get_attribute("data-id") == hits[0]["id"]
    page.wait_for_function("() => { const img = document.querySelector('.hit img.thumb');"
                           " return img && img.complete && img.naturalWidth > 0; }")
    if answer["results"][0]["anchor"]:
        page.wait_for_function("() => { const img = document.querySelector('.anchor img');"
                               " return img && img.complete && img.naturalWidth > 0; }")
    timings = page.text_content(".result .timings")
    assert "text " in timings and " ms" in timings and "search " in timings
    assert page.is_hidden("#error")

    screenshot = tmp_path / "serve_page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"screenshot of the results: {screenshot}")

    # the player seeks to the matching segment: click a hit whose segment does not start at 0
    index = next((i for i, hit in enumerate(hits) if hit["segment"] and hit["segment"][0] > 0), 0)
    hit = hits[index]
    start, end = hit["segment"]
    cards.nth(index).click()
    assert page.is_visible("#player")
    page.wait_for_function("start => { const v = document.getElementById('video');"
                           " return !v.error && v.readyState >= 1 && !v.seeking && v.currentTime >= start; }",
                           arg=start, timeout=15000)
    assert page.get_attribute("#video", "src") == hit["file"]
    assert f"{start:g}\u2013{end:g} s" in page.text_content("#player-info")  # 1 fps clips: whole seconds
    assert page.is_visible("#segment-bar")
    player = tmp_path / "serve_player.png"
    page.screenshot(path=str(player))
    print(f"screenshot of the player: {player}")
    page.click("#player-close")
    assert page.is_hidden("#player")
    assert page.problems == []


def test_several_queries_filters_and_errors_show_in_the_page(page, server):
    answer = _search(page, "a red circle | a blue square")  # one result section per query
    assert [r["query"] for r in answer["results"]] == ["a red circle", "a blue square"]
    assert page.eval_on_selector_all(".result h2", "heads => heads.map(h => h.textContent)") == \
        ["a red circle", "a blue square"]

    answer = _search(page, "a red circle", "tag=red")
    ids = page.eval_on_selector_all(".hit", "cards => cards.map(card => card.dataset.id)")
    assert ids and ids == [hit["id"] for hit in answer["results"][0]["hits"]]
    for video_id in ids:
        tags = _get_json(f"{server}/v1/videos/{video_id}")["fields"]["tag"]
        assert "red" in (tags if isinstance(tags, list) else [tags]), (video_id, tags)

    _search(page, "a red circle", "duration>100,\n")  # a trailing separator is ignored
    assert page.locator(".hit").count() == 0
    assert "No hits" in page.text_content(".no-hits")
    assert page.problems == []

    _search(page, "a red circle", "nosuchfield>1")  # the API's 400 detail, shown in the page
    error = page.text_content("#error")
    assert page.is_visible("#error") and "unknown filter field 'nosuchfield'" in error
    assert page.locator(".hit").count() == 0
    # the 400 is the one problem expected here: the browser logs it as a failed resource load
    assert page.problems and all("400" in problem for problem in page.problems), page.problems
