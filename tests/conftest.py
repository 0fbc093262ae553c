import os, pytest

@pytest.fixture(autouse=True, scope='session')
def _threads():
    # two cores: keep test processes from oversubscribing each other
    os.environ.setdefault('OMP_NUM_THREADS', '2')
