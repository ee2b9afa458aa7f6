"""Test-wide settings: set before torch is imported anywhere."""

import os

import pytest

# Spin-waiting OpenMP threads make small kernels ~40x slower on shared 2-core machines (design.md, Threads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# numpy's OpenBLAS threads spin while waiting as well; one thread is faster on a loaded machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


@pytest.fixture
def single_thread():
    """One torch thread for the test (modules opt in with ``pytest.mark.usefixtures("single_thread")``): tiny
    kernels on a shared 2-core machine are ~40x slower with spinning OpenMP threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _random_init_weights(name: str, path):
    """A reference architecture with random weights (a few BatchNorm updates, so activations are not
    degenerate) saved as safetensors: a real model file for tests that must not depend on a trained cache."""
    import torch
    from safetensors.torch import save_file

    from pipeline.models import build_model

    torch.manual_seed(0)
    model = build_model(name)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, 1, 28, 28))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def vgg_weights(tmp_path_factory):
    return _random_init_weights("vgg-fmnist", tmp_path_factory.mktemp("w") / "vgg.safetensors")


@pytest.fixture(scope="session")
def resnet_weights(tmp_path_factory):
    return _random_init_weights("resnet-fmnist", tmp_path_factory.mktemp("w") / "resnet.safetensors")
