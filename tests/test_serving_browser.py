"""The web page of `kedavra serve` in a real headless Chromium driven by selenium: load it, type a prompt, set a
few steps, click Generate, wait for the image, and check that it shows with its parameters and in the gallery,
that the gallery survives a reload (sessionStorage), and that a bad field shows the server's 422. A screenshot
is saved under pytest's tmp dir and, when KEDAVRA_ARTIFACTS names a folder, there too.

Needs Debian's chromium and chromium-driver (scripts/setup.sh --test installs them); skipped without them.
Selenium is pointed at /usr/bin/chromedriver, so Selenium Manager never tries to download a driver.
"""

import base64
import io
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from kedavra.formats.png_info import parse_parameters

pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402
from test_serving import SIZE, make_worker, models_dir, serve  # noqa: E402, F401  (models_dir: a fixture)

from kedavra.serving.app import ServerConfig  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package `chromium`
CHROMEDRIVER = Path("/usr/bin/chromedriver")  # Debian's package `chromium-driver`
PAGE_TIMEOUT_S = 60  # the tiny model answers in about a second; room for a loaded CI machine
WINDOW = (1280, 900)
PROMPT = "a red circle above a blue square"
STEPS = 6
ARTIFACTS_ENV = "KEDAVRA_ARTIFACTS"

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason=f"needs {CHROMIUM} and {CHROMEDRIVER}: apt-get install -y chromium chromium-driver")


@pytest.fixture
def browser():
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def save_screenshot(driver, tmp_path: Path) -> Path:
    path = tmp_path / "serving_page.png"
    assert driver.save_screenshot(str(path))
    if os.environ.get(ARTIFACTS_ENV):
        folder = Path(os.environ[ARTIFACTS_ENV])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.name)
    return path


def test_generate_from_the_page(browser, models_dir, tmp_path):  # noqa: F811
    worker = make_worker(models_dir)
    with serve(worker, ServerConfig(api_key=None, max_body_bytes=2**20)) as url:
        browser.get(f"{url}/")
        wait = WebDriverWait(browser, PAGE_TIMEOUT_S)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "sampler_name")).options) > 0)
        assert browser.find_element(By.ID, "model").text.startswith("tiny.safetensors [")
        browser.find_element(By.ID, "prompt").send_keys(PROMPT)
        for field, value in (("steps", STEPS), ("seed", 42), ("width", SIZE), ("height", SIZE)):
            element = browser.find_element(By.ID, field)
            element.clear()
            element.send_keys(str(value))
        Select(browser.find_element(By.ID, "sampler_name")).select_by_visible_text("DPM++ 2M")
        browser.find_element(By.ID, "generate").click()

        figure_image = wait.until(expected_conditions.visibility_of_element_located((By.CSS_SELECTOR,
                                                                                     "#result figure img")))
        text = browser.find_element(By.CSS_SELECTOR, "#result .parameters").text
        params = parse_parameters(text)
        # the server samples as A1111 1.10: DPM++ 2M's "Automatic" schedule type is Karras, written apart
        assert (params.prompt, params.steps, params.seed, params.sampler, params.schedule_type) == \
            (PROMPT, STEPS, 42, "DPM++ 2M", "Karras")
        assert (params.width, params.height, params.model) == (SIZE, SIZE, "tiny")
        src = figure_image.get_attribute("src")
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
            assert image.size == (SIZE, SIZE) and image.text["parameters"] == text
        assert "seed 42" in browser.find_element(By.ID, "status").text
        assert len(browser.find_elements(By.CSS_SELECTOR, "#gallery img")) == 1
        assert browser.find_element(By.ID, "generate").is_enabled()
        save_screenshot(browser, tmp_path)

        browser.refresh()  # the gallery lives in sessionStorage: it comes back with the page
        gallery = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery img"))
        assert len(gallery) == 1 and gallery[0].get_attribute("title") == text
        gallery[0].click()
        assert browser.find_element(By.CSS_SELECTOR, "#result .parameters").text == text

        browser.find_element(By.ID, "enable_hr").click()  # hires fix: the image at 1.5x, A1111's keys written
        Select(browser.find_element(By.ID, "hr_upscaler")).select_by_visible_text("Latent (nearest)")
        scale = browser.find_element(By.ID, "hr_scale")
        scale.clear()
        scale.send_keys("1.5")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) == 2)
        hires_text = browser.find_element(By.CSS_SELECTOR, "#result .parameters").text
        assert "Hires upscale: 1.5" in hires_text and "Hires upscaler: Latent (nearest)" in hires_text
        browser.find_element(By.ID, "enable_hr").click()

        width = wait.until(lambda d: d.find_element(By.ID, "width"))  # a bad field: the server's 422, shown
        width.clear()
        width.send_keys("31")  # not a multiple of the tiny VAE factor 2
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: "422" in d.find_element(By.ID, "status").text)
        assert "width" in browser.find_element(By.ID, "status").text
        assert len(browser.find_elements(By.CSS_SELECTOR, "#gallery img")) == 2
