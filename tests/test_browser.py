"""One real browser session (Debian's Chromium through Playwright): chat with capping, see the answer and the plot.

Saves ``artifacts/browser-chat.png``. Skipped when /usr/bin/chromium or the playwright package is missing
(never run ``playwright install``: the system Chromium is used).
"""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.test_app_gradio import MODEL, write_axis

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACT = Path(__file__).resolve().parents[1] / "artifacts" / "browser-chat.png"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium on this machine (apt install chromium)")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, smollm2):
    from app.context import AppContext
    from app.main import build_demo, launch
    from app.settings import AppConfig

    workspace = tmp_path_factory.mktemp("browser-workspace")
    run = workspace / "runs" / "demo"
    write_axis(run / "axis.safetensors")
    config = AppConfig(workspace=workspace, run_dir=str(run), device="cpu", dtype="float32", model_id=MODEL,
                       chat_max_new_tokens=16)
    ctx = AppContext(config=config)
    ctx.models.adopt(smollm2)
    demo = build_demo(ctx=ctx)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(demo, prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
        ctx.jobs.close()
        ctx.llm_jobs.close()


def test_chat_with_capping_in_chromium(app_url: str) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1400})
            page.goto(app_url, wait_until="domcontentloaded")
            page.get_by_role("tab", name="Steer & cap chat").click()
            page.locator("#intervention-mode").get_by_text("cap (floor tau on the projection)").click()
            page.locator("#chat-input textarea").fill("Who are you?")
            page.locator("#chat-send").click()
            status = page.locator("#chat-status")
            status.get_by_text("done: cap at layers 21-25").wait_for(timeout=120_000)

            steered = page.locator("#steered-chat")
            assert "Who are you?" in steered.inner_text()
            bot_messages = steered.locator(".message.bot, [data-testid='bot']")
            assert bot_messages.count() >= 1 and bot_messages.last.inner_text().strip()
            assert page.locator("#baseline-chat").locator(".message.bot, [data-testid='bot']").last.inner_text().strip()

            plot = page.locator("#projection-plot")
            plot.locator(".main-svg").first.wait_for(timeout=30_000)
            legend = plot.inner_text()
            assert "steered" in legend and "unsteered" in legend and "tau" in legend
            assert plot.locator("g.trace").count() >= 3  # steered, unsteered and the tau line

            ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
            page.locator("#chat-tab").screenshot(path=str(ARTIFACT))
            assert ARTIFACT.stat().st_size > 10_000
        finally:
            browser.close()
