"""Test configuration for the foca-kernels core suite.

TRITON_INTERPRET must be settled before foca_kernels imports its kernel module (it does so
lazily, on the first Triton launch; ``@triton.jit`` reads the variable at that import). On a
machine without a GPU the interpreter is the only way to run the Triton kernel, so it is
switched on here, first thing, unless the caller chose otherwise. With a GPU the caller
may export TRITON_INTERPRET=0 to test the compiled kernel on CUDA tensors (see ``device``).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run from anywhere, installed or not
    sys.path.insert(0, _ROOT)

import foca_kernels as fk  # noqa: E402
from foca_kernels.backend import interpreter_on, triton_installed  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# One intra-op thread: the suite's tensors are small, and on the shared 2-core machine
# torch's OpenMP workers spin against the Triton interpreter (numpy) and other jobs; with two
# threads a 131k-element elementwise op was measured at 70 ms instead of 0.5 ms. Results of
# elementwise ops do not depend on the thread count.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seed():
    """Seed every generator; tests that need an explicit one use ``gen`` / ``rng``."""
    random.seed(0)
    torch.manual_seed(0)
    return 0


@pytest.fixture
def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def rng(seed):
    return random.Random(seed)


@pytest.fixture(autouse=True)
def _no_global_backend():
    """A test that forces a backend globally must not leak it into the next test."""
    yield
    fk.set_backend(None)


@pytest.fixture
def device():
    """Where kernel tests put their tensors: CUDA when the compiled Triton kernel can run
    there (a GPU and no interpreter), else CPU (Triton through its interpreter)."""
    return torch.device("cuda" if HAS_CUDA and not interpreter_on() else "cpu")


def _backend_params():
    return [
        pytest.param("triton", id="triton",
                     marks=pytest.mark.skipif(not triton_installed(), reason="triton not installed")),
        pytest.param("torch", id="torch"),
    ]


@pytest.fixture(params=_backend_params())
def backend(request, device):
    """Both implementations of the fused update: the Triton kernel (interpreted on CPU) and
    the fused PyTorch path."""
    name = request.param
    if name == "triton" and device.type == "cpu" and not interpreter_on():
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 (set before foca_kernels runs a kernel)")
    return name


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests: deterministic and fast on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
