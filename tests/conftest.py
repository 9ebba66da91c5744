"""Fixtures: the released code's outputs, a small RMT loaded from the released-format checkpoint, one thread."""
import logging
import os

import pytest
import torch

if not torch.cuda.is_available():  # check the Triton kernels in Triton's CPU interpreter (before rmt is imported)
    os.environ.setdefault('TRITON_INTERPRET', '1')
if os.environ.get('PYTEST_XDIST_WORKER_COUNT'):  # `-n N`: the workers share the cores rather than each taking all
    torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ['PYTEST_XDIST_WORKER_COUNT'])))

from tests.helpers import FIXTURES, cleanup, load_small  # noqa: E402


# The longest files first: pytest-xdist (``--dist loadfile``) hands files to the workers in collection
# order, so a long file collected last would run alone at the end while the other worker idles.
LONGEST_FIRST = ('test_token_label_training.py', 'test_runtimes.py', 'test_export.py', 'test_compile.py',
                 'test_kernels.py', 'test_train.py', 'test_readme.py', 'test_verify.py')


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _log_handlers_of_this_test_only():
    """Scripts run in-process add a stderr log handler (timm's ``setup_default_logging``) bound to that test's
    captured stderr, which is closed after it: a later test would get logging's 'Logging error' tracebacks."""
    root = logging.getLogger()
    # also drop a stale handler an earlier module-level fixture left on a stream that is closed by now
    root.handlers[:] = [h for h in root.handlers if not getattr(getattr(h, 'stream', None), 'closed', False)]
    before = list(root.handlers)
    yield
    root.handlers[:] = before


@pytest.fixture(scope='session')
def expected():
    return torch.load(FIXTURES / 'official_small_expected.pt', weights_only=True)


@pytest.fixture(scope='session')
def expected_tl():
    return torch.load(FIXTURES / 'official_small_tokenlabel_expected.pt', weights_only=True)


@pytest.fixture(scope='session')
def small_model():
    return load_small()


@pytest.fixture
def thresholds():
    """Set the attention dispatch thresholds for one test, ``thresholds(block_bytes=1)``; the previous ones
    come back after it."""
    from rmt.attention import dispatch_thresholds, set_dispatch_thresholds
    previous = dispatch_thresholds()
    yield set_dispatch_thresholds
    set_dispatch_thresholds(*previous)


@pytest.fixture
def one_thread():
    """In-process script runs use one thread like the scripts' subprocesses: fast on a small shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='session', autouse=True)
def _session_dirs():
    """Temporary folders made by the helpers (digits, training runs) go when the session ends."""
    yield
    cleanup()
