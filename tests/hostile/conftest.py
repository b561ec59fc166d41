import pytest

from tta_norm import kernels


@pytest.fixture(params=["kernel", "aten"])
def path(request, monkeypatch):
    """Run the test on the compiled-kernel path and on the ATen path."""
    if request.param == "kernel":
        if kernels.kernel() is None:
            pytest.skip(f"compiled kernel unavailable: {kernels.status()}")
    else:
        monkeypatch.setattr(kernels, "_lib", None)
        monkeypatch.setattr(kernels, "_tried", True)
    return request.param
