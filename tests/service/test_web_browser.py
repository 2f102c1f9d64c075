"""The web page in a real headless browser (Chromium driven by Selenium) against a real server.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and ``selenium``
(the dev extra); without them the tests are skipped with the reason. Screenshots go to the test's
temporary folder, and also to ``$NANOMORPH_SCREENSHOT_DIR`` when set (how docs/img/ is made).
"""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.fixtures.emfiles import dm_bytes
from tests.fixtures.images import speck_image
from tests.fixtures.server import Server


def _find(*names: str) -> str | None:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM = _find("chromium", "chromium-browser", "google-chrome")
CHROMEDRIVER = _find("chromedriver")
try:
    import selenium  # noqa: F401

    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False

_missing = [
    what
    for what, ok in (
        ("chromium (apt-get install chromium)", CHROMIUM),
        ("chromedriver (apt-get install chromium-driver)", CHROMEDRIVER),
        ("selenium (pip install -e '.[dev]')", HAVE_SELENIUM),
    )
    if not ok
]
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(bool(_missing), reason="no headless browser: missing " + ", ".join(_missing)),
]

#: Seconds to wait for the page (generous: the shared CI machine can be heavily loaded).
WAIT_S = 120
#: Generous timeout: under load the 2-core test machine can take seconds to answer.
HTTP = httpx.Client(timeout=60)


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # type: ignore[assignment]
    # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager would otherwise try to download one.
    drv = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield drv
    finally:
        drv.quit()


def _screenshot(driver: Any, tmp_path: Path, name: str) -> Path:
    height = int(driver.execute_script("return document.body.scrollHeight"))
    driver.set_window_size(1280, min(height + 40, 4000))
    out = tmp_path / name
    assert driver.save_screenshot(str(out))
    assert Image.open(out).size[0] >= 1000
    extra = os.environ.get("NANOMORPH_SCREENSHOT_DIR")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(out, Path(extra) / name)
    driver.set_window_size(1280, 1000)
    return out


def _run(driver: Any, server: Server, task: str, files: list[Path]) -> list[Any]:
    """Opens the page, picks ``task`` and ``files``, waits until every card is finished."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(server.url + "/")
    WebDriverWait(driver, WAIT_S).until(lambda d: task in d.find_element(By.ID, "models").text)
    driver.find_element(By.CSS_SELECTOR, f"input[name=task][value={task}]").click()
    driver.find_element(By.ID, "files").send_keys("\n".join(str(f) for f in files))
    WebDriverWait(driver, WAIT_S).until(
        lambda d: (
            d.find_element(By.ID, "batch").is_displayed()
            and len(d.find_elements(By.CSS_SELECTOR, "#results .card")) == len(files)
        )
    )
    cards = driver.find_elements(By.CSS_SELECTOR, "#results .card")
    assert [c.get_attribute("data-status") for c in cards] == ["done"] * len(files), [c.text for c in cards]
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe
    return list(cards)


def _shown(cell: Any) -> tuple[float, Any]:
    """(the number as displayed, the exact value the page keeps in data-value)."""
    import json

    return float(cell.text), json.loads(cell.get_attribute("data-value"))


def _blob_text(driver: Any, link: Any) -> str:
    """Contents of a download link (a blob: URL) read back inside the page."""
    return str(
        driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch(arguments[0]).then(r => r.text()).then(done);",
            link.get_attribute("href"),
        )
    )


def _blob_b64(driver: Any, link: Any) -> bytes:
    b64 = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0]).then(r => r.arrayBuffer()).then(b => {"
        "  let s = ''; for (const x of new Uint8Array(b)) s += String.fromCharCode(x); done(btoa(s)); });",
        link.get_attribute("href"),
    )
    return base64.b64decode(b64)


def _files(tmp_path: Path) -> list[Path]:
    dark = tmp_path / "dark_speck.png"
    bright = tmp_path / "bright_speck.png"
    Image.fromarray(speck_image(False)).save(dark)
    Image.fromarray(speck_image(True, seed=1)).save(bright)
    # A calibrated DM4 frame with a bright horizontal band (the tiny segmenter's "wire").
    rng = np.random.default_rng(2)
    frame = (rng.random((96, 128)) * 800 + 200).astype(np.float32)
    frame[40:52, 10:118] = 3500
    dm4 = tmp_path / "frame.dm4"
    dm4.write_bytes(dm_bytes(frame, scale=0.8, unit="nm"))
    return [dark, bright, dm4]


def test_classify_in_the_browser(driver: Any, server: Server, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    files = _files(tmp_path)
    api = [
        HTTP.post(server.url + "/classify", files={"images": (f.name, f.read_bytes())}).json()["results"][0]
        for f in files
    ]
    cards = _run(driver, server, "classify", files)
    for card, f, expected in zip(cards, files, api, strict=True):
        assert card.find_element(By.CSS_SELECTOR, ".filename").text == f.name
        assert card.find_element(By.CSS_SELECTOR, ".label").text == expected["label"]
        flag = card.find_element(By.CSS_SELECTOR, ".ood")
        assert flag.get_attribute("data-flag") == str(expected["ood_flag"]).lower()
        text, exact = _shown(card.find_element(By.CSS_SELECTOR, "tr[data-key=confidence] td"))
        assert exact == pytest.approx(expected["confidence"], rel=1e-12)
        assert text == pytest.approx(expected["confidence"], rel=1e-3)
        text, exact = _shown(card.find_element(By.CSS_SELECTOR, "tr[data-key=ood_score] td"))
        assert text == pytest.approx(expected["ood_score"], rel=1e-3)
        for cls, p in expected["probabilities"].items():
            text, exact = _shown(
                card.find_element(By.CSS_SELECTOR, f'.probabilities tr[data-class="{cls}"] td')
            )
            assert exact == pytest.approx(p, rel=1e-12) and text == pytest.approx(p, rel=1e-3)
        # The picture was drawn (the preview of any format, DM4 included).
        canvas = card.find_element(By.CSS_SELECTOR, "canvas.view")
        assert int(canvas.get_attribute("width")) >= 128
    assert [a["label"] for a in api][:2] == ["singular", "network"]  # dark speck, bright speck

    csv = _blob_text(driver, driver.find_element(By.ID, "all-csv"))
    lines = csv.strip().splitlines()
    assert lines[0].split(",")[:6] == ["filename", "model", "label", "confidence", "ood_score", "ood_flag"]
    assert [line.split(",")[2] for line in lines[1:]] == [a["label"] for a in api]
    _screenshot(driver, tmp_path, "web-classify.png")


def test_segment_a_calibrated_dm4_in_the_browser(driver: Any, server: Server, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    dm4 = _files(tmp_path)[2]
    expected = HTTP.post(server.url + "/segment", files={"image": (dm4.name, dm4.read_bytes())}).json()
    assert expected["pixel_size"] == pytest.approx(0.8)
    (card,) = _run(driver, server, "segment", [dm4])

    assert "pixel size 0.8 nm" in card.find_element(By.CSS_SELECTOR, ".calibration").text
    legend = card.find_element(By.CSS_SELECTOR, ".legend").text
    for entry in expected["legend"]:
        assert entry["name"] in legend
    wire = expected["morphology"]["classes"]["wire"]
    section = card.find_element(By.CSS_SELECTOR, 'section[data-class="wire"]')
    for key in ("area_fraction", "n_domains", "area_nm2", "length_nm", "mean_width_nm"):
        text, exact = _shown(section.find_element(By.CSS_SELECTOR, f"tr[data-key={key}] td"))
        assert exact == pytest.approx(wire[key], rel=1e-12), key
        assert text == pytest.approx(wire[key], rel=1e-3), key
    assert wire["area_fraction"] == pytest.approx(12 * 108 / (96 * 128), rel=0.05)
    median = section.find_elements(By.CSS_SELECTOR, "tr[data-key=domain_area_nm2] td")[2]
    assert _shown(median)[1] == pytest.approx(wire["domain_area_nm2"]["median"])
    # The px twins are not shown when the physical number is.
    assert not section.find_elements(By.CSS_SELECTOR, "tr[data-key=area_px]")

    # The overlay is painted: the band's pixels on the canvas are tinted with the wire colour.
    tinted = driver.execute_script(
        "const c = arguments[0]; const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] > d[i + 2] + 60) n++; return n / (d.length / 4);",
        card.find_element(By.CSS_SELECTOR, "canvas.view"),
    )
    assert tinted == pytest.approx(wire["area_fraction"], abs=0.05)

    links = {a.text: a for a in card.find_elements(By.CSS_SELECTOR, ".downloads a")}
    assert {"mask PNG", "CSV", "JSON"} <= set(links)
    assert links["mask PNG"].get_attribute("download") == "frame_mask.png"
    assert _blob_b64(driver, links["mask PNG"]) == base64.b64decode(expected["mask_png"])
    csv = _blob_text(driver, links["CSV"])
    assert f"frame.dm4,{expected['model']},wire,area_fraction,{wire['area_fraction']}" in csv
    _screenshot(driver, tmp_path, "web-segment.png")


def test_api_docs_page_offers_authorize(driver: Any, server: Server) -> None:
    """Swagger UI at /docs renders the document offline, with the package version and an
    Authorize button (shown only when the document declares a security scheme)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    import nanomorph

    driver.get(server.url + "/docs")
    WebDriverWait(driver, WAIT_S).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".swagger-ui .info .title")
    )
    assert nanomorph.__version__ in driver.find_element(By.CSS_SELECTOR, ".swagger-ui .info").text
    assert driver.find_elements(By.CSS_SELECTOR, ".swagger-ui button.authorize")
    ops = driver.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock-summary-path")
    assert {"/classify", "/segment", "/preview"} <= {o.text.strip() for o in ops}


def test_token_field_when_auth_is_on(
    driver: Any, tiny_store: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.fixtures.server import start_server

    image = tmp_path / "dark.png"
    Image.fromarray(speck_image(False)).save(image)
    with start_server(
        tmp_path / "srv", store=tiny_store[0], env={"NANOMORPH_API_TOKENS": "web-token"}, timeout=180
    ) as srv:
        driver.get(srv.url + "/")
        WebDriverWait(driver, WAIT_S).until(lambda d: "token" in d.find_element(By.ID, "models").text)
        assert driver.find_element(By.ID, "token").is_displayed()
        # Without the token the request is refused, and the card says why.
        driver.find_element(By.ID, "files").send_keys(str(image))
        WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.ID, "batch").is_displayed())
        card = driver.find_element(By.CSS_SELECTOR, "#results .card")
        assert card.get_attribute("data-status") == "error" and "401" in card.text
        # With it, the models show up and the same file is classified.
        driver.find_element(By.ID, "token").send_keys("web-token", Keys.TAB)
        WebDriverWait(driver, WAIT_S).until(lambda d: "classify:" in d.find_element(By.ID, "models").text)
        driver.find_element(By.ID, "rerun").click()
        WebDriverWait(driver, WAIT_S).until(
            lambda d: d.find_element(By.CSS_SELECTOR, "#results .card").get_attribute("data-status") == "done"
        )
        assert driver.find_element(By.CSS_SELECTOR, "#results .card .label").text == "singular"
    driver.execute_script("sessionStorage.clear()")
