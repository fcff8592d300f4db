"""The page of `sfllava serve` in headless Chromium against the API, measured in one run.

    python -m bench.page_bench [--runs 5] [--screenshot docs/page.png]

A tiny model (conftest's shape, sharpened) serves a 10 s 640x360 video. For the same request (the
page's own body: a new conversation about the held video, streamed), alternately:
- page: `send` to the first answer character written into the page (the page's own
  `performance.now()` clock, kept on the answer as `data-first-ms`);
- API: an httpx client sending that body, to its first content chunk;
and the server's own ttft of each. Then the bytes of a page load (every request of it, as
Playwright counts them: headers and bodies), the contact sheet's time for the default
options, and a screenshot of the page with an answer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sfllava_convert.tiny.checkpoint import sharpen
from sfllava_convert.tiny.command import Server
from sfllava_convert.tiny.videos import make_ffv1_video

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
QUESTION = "What happens in this video?"


def api_first_chunk(client, body: dict) -> tuple[float, float]:
    """(client time to the first content chunk, the server's ttft) of a streamed request
    (`client`: one httpx.Client, its connection kept alive as the browser keeps its own)."""
    tic = time.perf_counter()
    first, ttft = None, None
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - tic
            if chunk.get("sfllava"):
                ttft = chunk["sfllava"]["timings_s"]["ttft"]
    return first, ttft


def build_model(tmp: Path) -> Path:
    """conftest's tiny model, sharpened (its answers follow the video, in visible text)."""
    from sfllava_app.cli import main as sfllava
    from sfllava_convert.tiny import write_source_checkpoint

    src = write_source_checkpoint(tmp / "tiny-src", layout="oryx-vit", seed=0)
    sharpen(src)
    assert sfllava(["convert", "--hf-path", str(src), "--mlx-path", str(tmp / "tiny"),
                    "--dtype", "float32"]) == 0
    return tmp / "tiny"


def load_bytes(requests) -> dict:
    out = {}
    for r in requests:
        s = r.sizes()
        kind = "page files" if "/v1/" not in r.url else "API calls"
        out[kind] = out.get(kind, 0) + sum(s[k] for k in ("requestHeadersSize", "requestBodySize",
                                                         "responseHeadersSize", "responseBodySize"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--screenshot", default=None, metavar="PNG")
    args = ap.parse_args()
    from playwright.sync_api import expect, sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="page-bench-"))
    model = build_model(tmp)
    media = tmp / "media"
    media.mkdir()
    make_ffv1_video(media / "holiday.mkv", 250, width=640, height=360, fps=25, seed=1)
    make_ffv1_video(media / "garden.mkv", 100, width=640, height=360, fps=25, seed=2)
    server = Server(["--model", model, "--media-dir", media, "--max-tokens", 24], tmp).wait()
    os.environ.pop("LD_PRELOAD", None)  # the browser side never gets OpenBLAS (NOTES.md)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            requests = []
            page.on("request", lambda r: requests.append(r))
            page.goto(server.url)
            item = page.get_by_test_id("video-item").filter(has_text="holiday.mkv")
            item.wait_for()
            page.wait_for_load_state("networkidle")
            loaded, load_requests = load_bytes(requests), len(requests)
            tic = time.perf_counter()
            item.click()
            expect(page.get_by_test_id("contact-sheet")).to_have_attribute("data-state", "ready",
                                                                           timeout=120_000)
            sheet_s = time.perf_counter() - tic
            bodies = []
            page.on("request", lambda r: bodies.append(r.post_data)
                    if r.url.endswith("/chat/completions") else None)

            def ask_on_page(question: str):
                n = page.get_by_test_id("assistant-message").count()
                page.get_by_test_id("prompt").fill(question)
                page.get_by_test_id("prompt").press("Enter")
                answer = page.get_by_test_id("assistant-message").nth(n)
                expect(answer).to_have_attribute("data-state", "done", timeout=120_000)
                ttft = float(answer.get_by_test_id("figures").get_attribute("data-ttft"))
                return float(answer.get_attribute("data-first-ms")) / 1000, ttft

            ask_on_page(QUESTION)  # the video encoded and held: every run below is "held"
            body = json.loads(bodies[-1])
            rows = {"page": [], "api": []}
            with server.http() as client:
                for _ in range(args.runs):
                    page.get_by_test_id("new-chat").click()
                    rows["page"].append(ask_on_page(QUESTION))
                    rows["api"].append(api_first_chunk(client, body))
            if args.screenshot:
                page.get_by_test_id("new-chat").click()
                ask_on_page(QUESTION)
                ask_on_page("And then?")
                page.screenshot(path=args.screenshot)
            browser.close()
    finally:
        server.stop()
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v))
           for k, v in rows.items()}
    print(f"load: {os.cpu_count()} CPUs seen, os.getloadavg {os.getloadavg()[0]:.1f}")
    print(f"page load: {loaded.get('page files', 0)} bytes of page files + "
          f"{loaded.get('API calls', 0)} bytes of API calls ({load_requests} requests)")
    print(f"contact sheet (128 frames of 640x360, plan beside it): {sheet_s:.2f} s on the page")
    print(f"{'':6} {'first character':>16} {'server ttft':>12}  (medians of {args.runs}, held video)")
    for k, (first, ttft) in med.items():
        print(f"{k:6} {first * 1000:13.1f} ms {ttft * 1000:9.1f} ms")
    print(f"page's first character - API client's: {(med['page'][0] - med['api'][0]) * 1000:+.1f} ms; "
          f"- its own request's server ttft: {(med['page'][0] - med['page'][1]) * 1000:+.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
