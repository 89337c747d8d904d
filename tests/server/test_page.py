"""The page `diffspeed serve` shows at `/`, driven in a real browser (Playwright + the system Chromium) against
the `live_server` fixture (a running server with tiny-sd)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
PROMPT = "a red circle on a white background"

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium binary at {CHROMIUM}")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, live_server):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{live_server}/")
    # the page sets data-ready once models, options, samplers and presets have answered
    page.wait_for_selector("body[data-ready='true']", timeout=30_000)
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def error_text(page) -> str:
    return page.locator("#error").inner_text() if page.locator("#error").is_visible() else ""


def test_generate_shows_image_parameters_and_timing(page, tmp_path):
    assert page.locator("#model option").count() >= 1
    assert "tiny-sd" in page.locator("#model").input_value()
    assert page.locator("#sampler").input_value() == "DPM++ 2M"
    assert page.locator("#steps").input_value() == "20"
    # width/height come from the model's native size (tiny-sd: 64), not the 512 fallback
    assert (page.locator("#width").input_value(), page.locator("#height").input_value()) == ("64", "64")
    assert error_text(page) == ""

    page.fill("#prompt", PROMPT)
    page.fill("#steps", "4")
    # record that Generate is disabled while the request runs, however quickly the server answers
    page.evaluate("""() => {
        const button = document.querySelector('#generate');
        window.__generateDisabled = false;
        new MutationObserver(() => { if (button.disabled) window.__generateDisabled = true; })
            .observe(button, {attributes: true, attributeFilter: ['disabled']});
    }""")
    page.click("#generate")
    page.wait_for_function(
        """() => document.querySelector('#result-image').naturalWidth > 0
                 || !document.querySelector('#error').hidden""",
        timeout=120_000,
    )
    assert error_text(page) == "", f"the page shows an error: {error_text(page)}"
    assert page.evaluate("window.__generateDisabled"), "Generate was not disabled while the request ran"
    assert page.locator("#generate").is_enabled()

    size = page.evaluate(
        "() => { const i = document.querySelector('#result-image'); return [i.naturalWidth, i.naturalHeight]; }"
    )
    assert size == [64, 64]
    colours = page.evaluate("""() => {
        const img = document.querySelector('#result-image');
        const canvas = document.createElement('canvas');
        canvas.width = img.naturalWidth;
        canvas.height = img.naturalHeight;
        const ctx = canvas.getContext('2d');
        ctx.drawImage(img, 0, 0);
        const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
        const seen = new Set();
        for (let i = 0; i < data.length; i += 4) seen.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
        return seen.size;
    }""")
    assert colours > 1, "the image is one flat colour"

    parameters = page.locator("#parameters").inner_text()
    assert PROMPT in parameters
    assert "Steps: 4" in parameters
    assert "steps/s" in page.locator("#timing").inner_text()

    folder = Path(os.environ.get("DIFFSPEED_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / "page.png"), full_page=True)


def test_validation_error_names_the_field(page):
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "0")
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    text = error_text(page)
    assert "steps" in text, text
    assert page.locator("#steps").get_attribute("aria-invalid") == "true"
    assert page.locator("#generate").is_enabled()
    assert page.locator("#result-image").is_hidden()


def test_every_control_is_labelled_and_fits_a_narrow_screen(page):
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
        .filter((c) => !document.querySelector(`label[for="${c.id}"]`)).map((c) => c.id || c.name)""")
    assert unlabelled == []
    page.set_viewport_size({"width": 375, "height": 740})
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a 375px screen"
