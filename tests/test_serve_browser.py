"""The page in a real headless browser (Debian's chromium-headless-shell driven by playwright) against a real
`mmsearch serve` process: search, thumbnails decoded, detail panel, more like this, upload, Back, phone width."""
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import build_served_index

CHROMIUM = "/usr/bin/chromium-headless-shell"
INSTALL = "apt-get update && apt-get install -y chromium-headless-shell"
START_BUDGET_S = 2.0  # the page answers within 2 s of launch (CPU seconds: see the test)
SCREENSHOT = os.environ.get("MMSEARCH_SCREENSHOT")  # where to keep the screenshot (the README's is made so)


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no headless Chromium at {CHROMIUM}: {INSTALL}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


def _get(url, timeout=5.0):
    with urllib.request.urlopen(url, timeout=timeout) as res:
        return res.status, res.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory, synth_dir, tiny_checkpoint):
    """A `mmsearch serve --port 0` process on 127.0.0.1; yields (base URL, photos dir, (wall, CPU) seconds from
    launch to the first page)."""
    idx, photos = build_served_index(tmp_path_factory.mktemp("browser"), synth_dir, tiny_checkpoint)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(Path(__file__).parents[1]))
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "mmsearch", "serve", "--index", str(idx), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = proc.stdout.readline()
        m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        assert m, line + proc.stdout.read() if proc.poll() is not None else line
        url = m.group(1)
        while True:
            try:
                if _get(url, timeout=1)[0] == 200:
                    break
            except OSError:
                time.sleep(0.02)
            assert time.perf_counter() - started < 30, "server did not answer"
        wall = time.perf_counter() - started
        with open(f"/proc/{proc.pid}/stat") as fh:  # utime + stime of the server process, in clock ticks
            ticks = sum(int(v) for v in fh.read().rsplit(")", 1)[1].split()[11:13])
        yield url, photos, (wall, ticks / os.sysconf("SC_CLK_TCK"))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _health(url):
    return json.loads(_get(url + "api/health")[1])


def _cards(page):
    return page.eval_on_selector_all(".card", "els => els.map(e => ({id: +e.dataset.id, path: e.title}))")


def _decoded(page, n):
    page.wait_for_function(
        "n => { const imgs = [...document.querySelectorAll('.card img')].slice(0, n);"
        " return imgs.length === n && imgs.every(i => i.complete && i.naturalWidth > 0); }", arg=n, timeout=20000)
    return page.eval_on_selector_all(".card img", "imgs => imgs.map(i => i.naturalWidth)")[:n]


def test_page_answers_within_two_seconds_of_launch(server):
    """Start-up is CPU work (imports, opening the catalog); on a quiet machine its CPU time is its wall time.
    The CPU time is what this test bounds, so a busy shared CI machine does not fail it by waiting for a core."""
    _, _, (wall, cpu) = server
    print(f"first page {wall:.2f} s wall, {cpu:.2f} CPU s after launch")
    assert cpu < START_BUDGET_S, f"first page after {cpu:.2f} CPU s ({wall:.2f} s wall)"


def test_search_detail_more_like_this_upload_and_back(browser, server, tmp_path):
    url, photos, _ = server
    page = browser.new_page(viewport={"width": 1200, "height": 820})
    problems = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.goto(url)

    # a text search with Enter: the URL holds the query, N thumbnails really decode
    page.fill("#q", "red circle")
    page.press("#q", "Enter")
    page.wait_for_selector(".card")
    assert all(w > 0 for w in _decoded(page, 8))
    assert "q=red+circle" in page.url
    first_text = _cards(page)
    assert len(first_text) == 24 and not page.is_hidden("#more")
    assert not _health(url)["torch_loaded"]  # text queries run on the numpy text tower

    # load more appends the next page (offset paging), then there is no more
    page.click("#more")
    page.wait_for_function("() => document.querySelectorAll('.card').length === 31")
    assert [c["id"] for c in _cards(page)][:24] == [c["id"] for c in first_text]
    assert page.is_hidden("#more")

    # the detail panel: path, captions of the corpus; then "more like this"
    page.click(".card >> nth=2")
    page.wait_for_selector("#detail:not([hidden])")
    page.wait_for_function("() => document.querySelectorAll('#d-texts li').length === 5")
    chosen = first_text[2]
    assert page.text_content("#d-path") == chosen["path"]
    if SCREENSHOT:
        page.evaluate("window.scrollTo(0, 0)")
        page.wait_for_timeout(200)
        page.screenshot(path=SCREENSHOT)
    page.click("#d-like")
    page.wait_for_function("id => new URL(location).searchParams.get('id') === String(id)", arg=chosen["id"])
    page.wait_for_function("id => document.querySelector('.card') && +document.querySelector('.card').dataset.id === id",
                           arg=chosen["id"])
    assert page.is_hidden("#detail") and "image #" in page.text_content("#chips")
    _decoded(page, 4)

    # an uploaded image as the query (the file picker): it finds itself first
    query = photos / "sub" / sorted(os.listdir(photos / "sub"))[0]
    page.set_input_files("#file", str(query))
    page.wait_for_function("p => document.querySelector('.card') && document.querySelector('.card').title === p",
                           arg=str(query), timeout=60000)
    assert "uploaded image" in page.text_content("#chips") and "image=upload" in page.url
    assert not _health(url)["torch_loaded"]  # the index's ONNX image tower embedded the upload

    # Back: more like this, then the text search, each restored from the URL
    page.go_back()
    page.wait_for_function("id => document.querySelector('.card') && +document.querySelector('.card').dataset.id === id",
                           arg=chosen["id"])
    page.go_back()
    page.wait_for_function("() => document.querySelector('#q').value === 'red circle'")
    page.wait_for_function("() => document.querySelectorAll('.card').length === 24")
    assert [c["id"] for c in _cards(page)] == [c["id"] for c in first_text]

    # a link reproduces a search; weighted terms become chips and a removed chip re-searches
    page.goto(url + "?q=2%3Ared+circle+%2B+blue+-+square")
    page.wait_for_selector(".chip >> text=square")
    assert page.eval_on_selector_all(".chip", "els => els.length") == 3
    page.click(".chip:has-text('square') button")
    page.wait_for_function("() => new URL(location).searchParams.get('q') === '2:red circle + blue'")
    assert all(w > 0 for w in _decoded(page, 6))
    assert problems == []
    page.screenshot(path=str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_keyboard_and_phone_width(browser, server):
    url, _, _ = server
    page = browser.new_page(viewport={"width": 390, "height": 844})
    page.goto(url + "?q=blue+square")
    page.wait_for_selector(".card")
    _decoded(page, 2)
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scroll
    page.focus(".card >> nth=0")
    page.keyboard.press("Enter")  # cards are buttons
    page.wait_for_selector("#detail:not([hidden])")
    page.keyboard.press("Escape")
    page.wait_for_selector("#detail", state="hidden")
    assert page.evaluate("() => document.activeElement.classList.contains('card')")  # focus returns to the card
    page.keyboard.press("/")
    assert page.evaluate("() => document.activeElement.id") == "q"


def _api(url, path):
    return json.loads(_get(url + path)[1])


def test_date_filter_to_is_inclusive_and_one_day_works(browser, server):
    """Issue 31 item 16: the page's "To" was exclusive (To = May 31 dropped May 31) and From = To was an error;
    the page now sends the API's inclusive `until`."""
    import datetime as dt

    url, _, _ = server
    hit = _api(url, "api/search?q=red+circle&k=1")["hits"][0]
    meta = _api(url, f"api/images/{hit['id']}")
    day = dt.datetime.fromtimestamp(meta["taken_at"] or meta["mtime"], dt.timezone.utc).date()
    on_day = len(_api(url, f"api/search?q=red+circle&k=200&after={day}&until={day}")["hits"])
    assert on_day >= 1
    page = browser.new_page(viewport={"width": 1200, "height": 820})
    page.goto(url + "?q=red+circle")
    page.wait_for_selector(".card")
    page.click("#toggle-filters")
    page.fill("#until", str(day))  # To = the photos' day, no From: that day is kept
    page.wait_for_function("d => new URL(location).searchParams.get('until') === d", arg=str(day))
    page.wait_for_function("n => document.querySelectorAll('.card').length === n", arg=min(on_day, 24))
    page.fill("#after", str(day))  # From = To: one day
    page.wait_for_function("d => new URL(location).searchParams.get('after') === d", arg=str(day))
    page.wait_for_function("n => document.querySelectorAll('.card').length === n", arg=min(on_day, 24))
    assert not page.eval_on_selector("#status", "e => e.classList.contains('error')"), page.text_content("#status")
    assert hit["id"] in [c["id"] for c in _cards(page)]
    page.fill("#until", str(day - dt.timedelta(days=1)))  # To before From: the API's one-line reason
    page.wait_for_function("() => document.querySelector('#status').classList.contains('error')")


def test_an_oversized_upload_says_too_large(browser, server, tmp_path):
    """Issue 31 item 17: the page checks the cap itself, and when a page does not know it (an old tab, a cap
    changed by a restart) the server's 413 reaches the page instead of a connection reset."""
    url, _, _ = server
    cap = _api(url, "api/info")["max_upload_bytes"]
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(cap + (1 << 20)))
    page = browser.new_page()
    page.goto(url)
    page.wait_for_function("() => document.querySelector('#q').placeholder.startsWith('Search ')")
    page.set_input_files("#file", str(big))
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('too large')")

    unaware = browser.new_page()
    unaware.route("**/api/info", lambda route: route.fulfill(json=dict(route.fetch().json(), max_upload_bytes=1 << 40)))
    unaware.goto(url)
    unaware.wait_for_function("() => document.querySelector('#q').placeholder.startsWith('Search ')")
    unaware.set_input_files("#file", str(big))
    unaware.wait_for_function("() => document.querySelector('#status').textContent.includes('too large')",
                              timeout=30000)
    assert "limit" in unaware.text_content("#status")
