import os, pytest

@pytest.fixture(autouse=True, scope='session')
def _threads():
    # two cores: keep test processes from oversubscribing each other
    os.environ.setdefault('OMP_NUM_THREADS', '2')

def pytest_configure(config):
    config.addinivalue_line('markers', 'browser: drives JupyterLab in headless chromium (Debian chromium + chromium-driver); '
                            'skipped where they are absent; deselect with -m "not browser"')
