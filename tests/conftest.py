"""Shared test setup: CPU kernels capped as `sida` caps them (before torch loads, so this process and every
subprocess and Ray worker it starts compute alike), one torch thread (tiny CPU convolutions are several times
slower with two threads on a busy 2-core machine) and a private cache so tests never touch ~/.cache/sida."""
import os

from sida_core.determinism import pin_cpu_kernels

pin_cpu_kernels()

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.s3_server import s3_bucket, s3_server  # noqa: F401,E402  (a real moto S3 server, on demand)

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _sida_cache(tmp_path_factory):
    if "SIDA_TEST_CACHE" in os.environ:  # reuse across runs when the developer asks for it
        os.environ["SIDA_CACHE"] = os.environ["SIDA_TEST_CACHE"]
    else:
        os.environ["SIDA_CACHE"] = str(tmp_path_factory.mktemp("sida-cache"))
    yield
