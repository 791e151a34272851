"""The class explorer in a real browser: `propscope explore` against the real stack, driven by
selenium in Debian's headless Chromium (chromedriver from the system, never downloaded).

The page picks a model and a class, uploads docs/sample-patch.png and must draw every picture
(real images, not placeholders) with the numbers the SDK returns for the same calls. Small
settings keep it cheap. Screenshots go to the test's tmp_path, and to
$PROPSCOPE_EXPLORER_SCREENSHOTS (a folder: docs/ for the README's) when set.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from propscope_dev import stack

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "docs" / "sample-patch.png"
MANIFEST = ROOT / "examples" / "concepts" / "manifest.csv"
MODEL, CLASS = "synth_patch", 1  # sample-patch.png: the patch-biased model says "square"
SETTINGS = {
    "--steps": "10",
    "--seed": "0",
    "--sobol-grid": "4",
    "--sobol-design": "8",
    "--images-per-class": "8",
    "--concept-rank": "3",
    "--concept-design": "8",
    "--pictures": "2",
    "--maco-steps": "24",
    "--maco-crops": "4",
}
PANELS = ("class-picture", "concepts", "propgrad", "sobol", "concept-map")
SETTLE_S = 150


@pytest.fixture
def explorer(live_stack, tmp_path):
    """`propscope explore` on a free port; its URL once it answers."""
    port = stack.free_port()
    options = [item for pair in SETTINGS.items() for item in pair]
    log = (tmp_path / "explorer.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "propscope", "explore", "--address", live_stack.gateway]
        + ["--port", str(port), "--images", str(MANIFEST), *options],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "api/settings", timeout=2).read()
                break
            except OSError:
                assert process.poll() is None, (tmp_path / "explorer.log").read_text()
                assert time.monotonic() < deadline, "the explorer did not answer in 30 s"
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


@pytest.fixture
def browser(tmp_path):
    chromedriver = shutil.which("chromedriver")
    assert chromedriver, "chromedriver is missing: `make setup` installs chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,2600",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def panel_states(driver) -> dict[str, str]:
    return driver.execute_script(
        "const ids = arguments[0]; const states = {};"
        "for (const id of ids) states[id] = document.getElementById(id).dataset.state;"
        "document.querySelectorAll('.concept-picture').forEach((slot, i) => {"
        "  if (slot.dataset.state !== 'idle') states['concept-picture-' + i] = slot.dataset.state;"
        "});"
        "return states;",
        list(PANELS),
    )


def figure(panel, key: str) -> float:
    return float(
        panel.find_element(By.CSS_SELECTOR, f'dd[data-key="{key}"]').get_attribute("data-value")
    )


def test_the_explorer_draws_a_class_and_an_image(explorer, browser, client, tmp_path):
    browser.get(explorer)
    WebDriverWait(browser, 30).until(
        lambda driver: len(Select(driver.find_element(By.ID, "model")).options) > 0
    )
    Select(browser.find_element(By.ID, "model")).select_by_value(MODEL)
    Select(browser.find_element(By.ID, "class")).select_by_value(str(CLASS))
    browser.find_element(By.ID, "upload").send_keys(str(SAMPLE))

    def settled(driver) -> dict[str, str] | None:
        states = panel_states(driver)
        return (
            states if "loading" not in states.values() and "idle" not in states.values() else None
        )

    states = WebDriverWait(browser, SETTLE_S, poll_frequency=0.5).until(settled)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, height + 40)
    browser.save_screenshot(str(tmp_path / "explorer.png"))
    browser.find_element(By.ID, "image-section").screenshot(str(tmp_path / "explorer-image.png"))
    errors = browser.execute_script(
        "return [...document.querySelectorAll('.error')].map(e => e.closest('[id]').id + ': ' + e.textContent)"
    )
    assert all(state == "done" for state in states.values()), (states, errors)

    # Every picture is a decoded image; no placeholder is left.
    pictures = browser.execute_script(
        "return [...document.querySelectorAll('.panel img, .concept-picture img')]"
        ".map(i => [i.className, i.complete, i.naturalWidth, i.naturalHeight])"
    )
    kinds = {kind for kind, *_ in pictures}
    assert {"picture", "crop", "step", "overlay", "small-overlay"} <= kinds, kinds
    assert all(complete and width > 0 and height > 0 for _, complete, width, height in pictures)
    assert not browser.find_elements(By.CSS_SELECTOR, ".placeholder")

    print(f"screenshots in {tmp_path}")
    folder = os.environ.get("PROPSCOPE_EXPLORER_SCREENSHOTS")
    if folder:
        for name in ("explorer.png", "explorer-image.png"):
            shutil.copyfile(tmp_path / name, Path(folder) / name)

    # The numbers are the SDK's for the same calls.
    image = SAMPLE.read_bytes()
    explained = client.explain(
        image,
        MODEL,
        {
            "object_hue": "procedural:operation=hue,region=object",
            "patch": "procedural:operation=blend",
            "background_brightness": "procedural:operation=brightness,region=background,amount=0.2",
        },
        steps=10,
        seed=0,
        target_class=CLASS,
    ).result()
    for found in explained.properties:
        row = browser.find_element(
            By.CSS_SELECTOR, f'.property[data-property="{found.property_name}"]'
        )
        assert figure(row, "score") == found.score
        assert figure(row, "p_value") == found.p_value
        line = row.find_element(By.TAG_NAME, "polyline").get_attribute("data-values")
        assert [float(v) for v in line.strip("[]").split(",")] == list(
            found.samples[0].prediction_curve
        )
        assert len(row.find_elements(By.CSS_SELECTOR, "img.step")) == len(
            found.samples[0].prediction_curve
        )

    attribution = client.attribute(image, MODEL, grid_size=4, nb_design=8, target_class=CLASS)
    sobol = browser.find_element(By.ID, "sobol")
    assert figure(sobol, "original_score") == attribution.original_score
    assert figure(sobol, "target_class") == attribution.target_class == CLASS

    concepts = browser.find_element(By.ID, "concepts")
    bank = client.concept_bank(
        concepts.find_element(By.CSS_SELECTOR, "[data-bank-id]").get_attribute("data-bank-id")
    )
    shown = [
        (int(card.get_attribute("data-concept")), figure(card, "importance"))
        for card in concepts.find_elements(By.CSS_SELECTOR, ".concept")
    ]
    assert shown == [(c.index, c.sobol_total_importance) for c in bank.concepts]
    maps = browser.find_elements(By.CSS_SELECTOR, "#concept-map figure")
    assert len(maps) == len(bank.concepts)
