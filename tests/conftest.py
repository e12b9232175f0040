"""Test session setup.

Without CUDA the Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET
must be set before anything imports triton / tileattn's kernels (``@triton.jit``
decides between compiled and interpreted functions at decoration time), so it
is set here, at conftest import, before any test module is collected. Then the
interpreter's bfloat16 bugs are patched (tileattn._interpreter).

With CUDA, nothing is changed and the tests use the large parametrizations
(see tests/_helpers.py: LARGE, TILEATTN_TEST_SIZE).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from tileattn._interpreter import patch_interpreter_bf16_dot  # noqa: E402

patch_interpreter_bf16_dot()

from _helpers import DEVICE, LARGE, ON_GPU, make_gen  # noqa: E402


def pytest_configure(config):
    # Noise from Triton's interpreter itself (numpy deprecation inside interpreter.py; log2(0) = -inf
    # is how the kernels' masked rows are meant to come out).
    config.addinivalue_line(
        "filterwarnings", "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"
    )
    config.addinivalue_line("filterwarnings", "ignore:divide by zero encountered in log2:RuntimeWarning")
    config.addinivalue_line("filterwarnings", "ignore:divide by zero encountered in log:RuntimeWarning")


def pytest_report_header(config):
    mode = "CUDA" if ON_GPU else "CPU / TRITON_INTERPRET=1 (bf16 interpreter patch applied)"
    return f"tileattn tests: device={DEVICE} ({mode}), shapes={'large' if LARGE else 'small'}"


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (GPU-only property; CPU runs use the Triton interpreter)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def on_gpu():
    return ON_GPU


@pytest.fixture
def gen(request):
    """A torch.Generator seeded from the test's node id (stable, order-independent)."""
    import zlib

    return make_gen(zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF)


@pytest.fixture(autouse=True)
def _launch_plans_off(monkeypatch):
    """Launch plans (kernels/plans.py, on by default for users since session 21) replay a call without going
    through the launchers that tests spy on or the tables they patch: off in every test unless
    TILEATTN_LAUNCH_PLANS is set outside (``gpu_run.sh plan-suite`` runs the forward, backward, feature and API
    tests again with it on) or the test turns it on (tests/test_plans.py). Plans start empty."""
    from tileattn.kernels import plans
    monkeypatch.setattr(plans, "_PLANS", {})
    monkeypatch.setattr(plans, "_SEEN", set())
    if "TILEATTN_LAUNCH_PLANS" not in os.environ:
        monkeypatch.setenv("TILEATTN_LAUNCH_PLANS", "0")
