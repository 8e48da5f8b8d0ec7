"""The dashboard in a real browser against the real server: Load, progress, Cancel, Unload,
memory bars, two tabs live, a reconnect after a restart; a screenshot mid-load."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from playwright.sync_api import Page, expect

from conftest import ARTIFACTS, BIG, Server, eventually

DEMO = "demo/tiny-sd"
TIMEOUT_MS = 60_000


def card(page: Page, model_id: str) -> Any:
    return page.locator(f'li.model[data-model-id="{model_id}"]')


def open_page(context: Any, server: Server) -> Page:
    page = context.new_page()
    page.goto(server.url)
    expect(page.locator("#connection")).to_have_text("Live.", timeout=TIMEOUT_MS)
    return page


def seen(page: Page, model_id: str) -> list[str]:
    return [s.split(" | ", 1)[1] for s in page.evaluate("window.seenSteps") if s.startswith(model_id + " | ")]


def test_load_shows_every_step_in_both_tabs_then_unload(context: Any, server: Server) -> None:
    """Load on the demo model shows the step bar pass step 4 and reach 8/8 in the tab that
    clicked and in a second tab; the memory bar counts it; Unload in the second tab empties both.
    No console error on the way (a Content-Security-Policy violation would be one)."""
    errors: list[str] = []
    context.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    context.on("weberror", lambda e: errors.append(str(e.error)))
    first, second = open_page(context, server), open_page(context, server)
    expect(card(first, DEMO)).to_have_attribute("data-state", "UNLOADED")

    first.get_by_role("button", name=f"Load {DEMO}").click()

    for page in (first, second):
        expect(card(page, DEMO)).to_have_attribute("data-state", "LOADED", timeout=TIMEOUT_MS)
        expect(card(page, DEMO).locator(".step-label")).to_have_text(re.compile(r"^step 8/8 "))
        expect(card(page, DEMO).locator("progress.step-bar")).to_have_attribute("value", "8")
        # A loaded model keeps its last step but no byte figures.
        expect(card(page, DEMO).locator(".byte-label")).to_be_hidden()
        expect(card(page, DEMO).locator(".facts")).to_contain_text("last used")
        steps = seen(page, DEMO)
        assert any(s.startswith("step 4/8 Loading model weights") for s in steps), steps
        assert steps[-1].startswith("step 8/8"), steps
        # The cpu's memory bar counts the model once GetResources has been asked again.
        expect(page.locator('.device[data-device="cpu"] .device-models')).to_contain_text(DEMO, timeout=TIMEOUT_MS)
    used = second.locator('.device[data-device="cpu"] progress').first
    assert float(used.get_attribute("value") or 0) > 0

    second.get_by_role("button", name=f"Unload {DEMO}").click()
    for page in (first, second):
        expect(card(page, DEMO)).to_have_attribute("data-state", "UNLOADED", timeout=TIMEOUT_MS)
        expect(page.get_by_role("button", name=f"Load {DEMO}")).to_be_visible()
    expect(second.locator("#action")).to_have_text(f"Unloaded {DEMO}.")
    assert errors == [], errors


def test_cancel_a_slow_load_from_the_form(context: Any, server: Server) -> None:
    """A slow load (the local Hub streams its weights at 2 MiB/s) started from the form shows byte
    progress (screenshot saved mid-load); Cancel stops it: both tabs say CANCELLED and show the
    model UNLOADED."""
    first, second = open_page(context, server), open_page(context, server)
    first.get_by_label("Model id").fill(BIG)
    first.get_by_label("Dtype").select_option("bf16")
    first.locator("#load-form").get_by_role("button", name="Load").click()

    big = card(first, BIG)
    expect(big).to_have_attribute("data-state", "LOADING", timeout=TIMEOUT_MS)
    # Mid-load at step 4 with a rate and an ETA: the screenshot the README shows.
    first.wait_for_function(
        """() => {
          const step = document.querySelector('[data-model-id="org/big"] .step-label')?.textContent ?? '';
          const bytes = document.querySelector('[data-model-id="org/big"] .byte-label')?.textContent ?? '';
          return step.startsWith('step 4/8') && bytes.endsWith('left');
        }""",
        polling="raf", timeout=TIMEOUT_MS)
    expect(card(second, BIG).locator(".byte-bar")).to_be_visible(timeout=TIMEOUT_MS)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    first.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

    first.get_by_role("button", name=f"Cancel loading {BIG}").click()
    for page in (first, second):
        expect(card(page, BIG)).to_have_attribute("data-state", "UNLOADED", timeout=TIMEOUT_MS)
        expect(card(page, BIG).locator(".outcome")).to_have_text(re.compile(r"^CANCELLED: the load stopped at step 4/8"))
        expect(card(page, BIG).locator(".progress")).to_be_hidden()
    expect(first.locator("#action")).to_have_text(f"Cancelled the load of {BIG}.")
    # Nothing stays booked for the cancelled load.
    expect(first.locator('.device[data-device="cpu"] .summary')).to_contain_text("reserved 0 B", timeout=TIMEOUT_MS)


def test_reconnects_after_a_server_restart(context: Any, server: Server) -> None:
    """When the server goes away the page says so and retries; once it is back the page is live
    again and follows new events."""
    page = open_page(context, server)
    server.stop()
    expect(page.locator("#connection")).to_have_text(re.compile(r"^Connection to the server lost .*Reconnecting in"), timeout=TIMEOUT_MS)
    server.start()
    expect(page.locator("#connection")).to_have_text("Live again: reconnected to the server.", timeout=TIMEOUT_MS)
    page.get_by_role("button", name=f"Load {DEMO}").click()
    expect(card(page, DEMO)).to_have_attribute("data-state", "LOADED", timeout=TIMEOUT_MS)


def test_page_fits_400_px_and_reloads_fast_enough_to_measure(context: Any, server: Server) -> None:
    """At 400 px wide nothing scrolls sideways and every button is reachable; the time from
    navigation to the first rendered model list is measured (written beside the screenshot)."""
    page = open_page(context, server)
    page.set_viewport_size({"width": 400, "height": 800})
    assert page.evaluate("document.documentElement.scrollWidth <= 400"), "the page scrolls sideways at 400 px"
    button = page.get_by_role("button", name=f"Load {DEMO}")
    button.focus()
    expect(button).to_be_focused()
    times = []
    for _ in range(5):
        page.reload()
        expect(card(page, DEMO)).to_be_visible(timeout=TIMEOUT_MS)
        eventually(lambda: page.evaluate("performance.getEntriesByName('models-rendered').length") > 0, "the mark")
        times.append(page.evaluate("performance.getEntriesByName('models-rendered')[0].startTime"))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "reload-ms.txt").write_text(" ".join(f"{t:.0f}" for t in times) + "\n")


def test_with_auth_the_page_asks_for_a_token_kept_in_the_tab(context: Any, start_server: Callable[..., Server],
                                                              tmp_path: Path) -> None:
    """With --auth-token-file the page asks for a token, uses it as a bearer token, keeps it in
    sessionStorage only; a read token may watch but Load is refused with PERMISSION_DENIED."""
    tokens = tmp_path / "tokens"
    tokens.write_text("admin:admin-secret-token\nread:read-secret-token\n")
    server = start_server("--auth-token-file", str(tokens))
    page = context.new_page()
    page.goto(server.url)
    expect(page.locator("#connection")).to_have_text("The server wants a token.", timeout=TIMEOUT_MS)
    page.get_by_label("Token").fill("read-secret-token")
    page.get_by_role("button", name="Use token").click()
    expect(page.locator("#connection")).to_have_text("Live.", timeout=TIMEOUT_MS)
    expect(card(page, DEMO)).to_have_attribute("data-state", "UNLOADED")
    assert page.evaluate("sessionStorage.getItem('model-loader-token')") == "read-secret-token"
    assert page.evaluate("localStorage.length") == 0

    page.get_by_role("button", name=f"Load {DEMO}").click()
    expect(page.locator("#action")).to_have_text(re.compile(r"^Load demo/tiny-sd failed: PERMISSION_DENIED: "),
                                                 timeout=TIMEOUT_MS)

    # Another tab of the same browser has its own sessionStorage: it asks again.
    other = context.new_page()
    other.goto(server.url)
    expect(other.locator("#connection")).to_have_text("The server wants a token.", timeout=TIMEOUT_MS)
    other.get_by_label("Token").fill("admin-secret-token")
    other.get_by_role("button", name="Use token").click()
    other.get_by_role("button", name=f"Load {DEMO}").click()
    expect(card(other, DEMO)).to_have_attribute("data-state", "LOADED", timeout=TIMEOUT_MS)
    expect(card(page, DEMO)).to_have_attribute("data-state", "LOADED", timeout=TIMEOUT_MS)


def test_unload_of_an_attached_model_asks_then_forces(context: Any, start_server: Callable[..., Server],
                                                      tmp_path: Path) -> None:
    """A model with an attached client shows the count and a Force unload button; dismissing the
    confirmation leaves it LOADED, accepting it unloads with force and closes the client."""
    from model_loader import attach

    sock = tmp_path / "attach.sock"
    server = start_server("--attach-socket", str(sock))
    page = open_page(context, server)
    with attach(DEMO, sock, load_if_needed=True) as client:
        demo = card(page, DEMO)
        expect(demo).to_have_attribute("data-state", "LOADED", timeout=TIMEOUT_MS)
        expect(demo.locator(".facts")).to_contain_text(re.compile(r"attached clients\s*1(?!\d)"), timeout=TIMEOUT_MS)
        button = page.get_by_role("button", name=f"Unload {DEMO}")
        expect(button).to_have_text("Force unload")

        asked: list[str] = []
        page.once("dialog", lambda d: (asked.append(d.message), d.dismiss()))
        button.click()
        eventually(lambda: len(asked) == 1, "the confirmation")
        assert "1 attached client" in asked[0], asked
        expect(demo).to_have_attribute("data-state", "LOADED")

        page.once("dialog", lambda d: d.accept())
        button.click()
        expect(demo).to_have_attribute("data-state", "UNLOADED", timeout=TIMEOUT_MS)
        assert client.wait_closed(timeout=30), "the forced unload closes the attached client"


def test_a_failed_load_shows_its_error_in_every_tab(context: Any, server: Server) -> None:
    """Loading a corrupt model leaves it FAILED with the server's message and its kind on the
    card, in the tab that clicked and in another; Load stays offered to retry."""
    first, second = open_page(context, server), open_page(context, server)
    first.get_by_role("button", name="Load broken").click()
    for page in (first, second):
        broken = card(page, "broken")
        expect(broken).to_have_attribute("data-state", "FAILED", timeout=TIMEOUT_MS)
        expect(broken.locator(".error")).to_have_text(re.compile(r"^Last error \(corrupt\): .*model\.safetensors"))
        expect(page.get_by_role("button", name="Load broken")).to_be_visible()
