"""Headless chromium for the browser tests (Debian's chromium and chromium-driver, driven by selenium). Without them the
tests skip, unless QCLIP_REQUIRE_BROWSER=1 (set by .ci/run, which installs them): then they fail, saying what is missing."""
import os, shutil
import pytest

CHROMIUM = shutil.which(os.environ.get('CHROMIUM', 'chromium')) or shutil.which('chromium-browser')  # $CHROMIUM: another binary
CHROMEDRIVER = shutil.which(os.environ.get('CHROMEDRIVER', 'chromedriver'))
REQUIRED = os.environ.get('QCLIP_REQUIRE_BROWSER', '') not in ('', '0')
try: from selenium import webdriver
except ImportError: webdriver = None
MISSING = ', '.join(w for w, ok in [('chromium', CHROMIUM), ('chromedriver', CHROMEDRIVER), ('selenium', webdriver)] if not ok)
WHY = (f"needs {MISSING} (Debian: apt-get install chromium chromium-driver; selenium: pip install -e '.[dev]')"
       if MISSING else '')
# the flags that run it here: no sandbox (root, containers), no GPU, no network of its own
FLAGS = ('--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage')

def marks()->list:
    "A browser test's marks: `browser`, and skipped where chromium is missing unless QCLIP_REQUIRE_BROWSER=1."
    return [pytest.mark.browser] + ([pytest.mark.skipif(bool(MISSING), reason=WHY)] if not REQUIRED else [])

def require():
    "Fail (a test that got past `marks()`, so QCLIP_REQUIRE_BROWSER=1) when chromium, its driver or selenium is missing."
    if MISSING: pytest.fail(f'QCLIP_REQUIRE_BROWSER=1, but the browser test {WHY}', pytrace=False)

def chromium(tmp_path, width:int=1400, height:int=1000):
    "A headless chromium with a fresh profile in `tmp_path` (`require`d first)."
    require()
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in (*FLAGS, f'--window-size={width},{height}', f'--user-data-dir={tmp_path/"chromium-profile"}'): opts.add_argument(a)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=opts)
