"""`lmforge webui` in a real browser: Debian's headless Chromium, driven by Selenium through Debian's
chromium-driver (nothing downloads a browser), loads the page, starts a tiny training, waits for the loss
curve and saves a screenshot that must not be blank."""

import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from lmforge.webui.app import Webui

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
INSTALL = "apt-get install -y chromium chromium-driver"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and DRIVER), reason=f"headless Chromium is not installed: {INSTALL}"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture()
def page_url(tiny_llama_dir, tmp_path):
    """The page with the Train tab filled as `lmforge webui CONFIG.yaml` fills it: 12 steps of tiny LoRA SFT."""
    prefill = {"model_name_or_path": str(tiny_llama_dir), "dataset": "alpaca_demo", "dataset_dir": str(ROOT / "data"),
               "template": "chatml", "max_steps": 12, "logging_steps": 1, "per_device_train_batch_size": 2,
               "learning_rate": 5e-2, "lora_rank": 4, "cutoff_len": 256, "output_dir": str(tmp_path / "run"),
               "save_strategy": "no"}
    ui = Webui(prefill, workdir=tmp_path / "webui")
    yield ui.launch("127.0.0.1", free_port())
    ui.close()


def test_page_trains_and_draws_the_loss_curve(browser, page_url, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(page_url)
    WebDriverWait(browser, 60).until(ec.element_to_be_clickable((By.ID, "train_start"))).click()
    status = browser.find_element(By.CSS_SELECTOR, "#train_status textarea")
    WebDriverWait(browser, 300).until(lambda _: status.get_attribute("value").startswith(("finished", "lmforge")))
    assert status.get_attribute("value").startswith("finished: outputs in "), status.get_attribute("value")
    plot = "#loss_plot canvas, #loss_plot svg"
    WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, plot))
    time.sleep(2)  # the chart's last redraw
    shot = tmp_path / "webui.png"
    assert browser.save_screenshot(str(shot))
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape[0] > 500 and pixels.var() > 100, pixels.var()  # a blank page has (almost) no variance
    assert "lmforge" in browser.title
