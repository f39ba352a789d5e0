"""Shared test setup: one torch thread (tiny CPU convolutions are several times slower with two threads
on a busy 2-core machine) and a private cache so tests never touch ~/.cache/sida."""
import os

import pytest
import torch

from tests.s3_server import s3_bucket, s3_server  # noqa: F401  (a real moto S3 server, on demand)

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _sida_cache(tmp_path_factory):
    if "SIDA_TEST_CACHE" in os.environ:  # reuse across runs when the developer asks for it
        os.environ["SIDA_CACHE"] = os.environ["SIDA_TEST_CACHE"]
    else:
        os.environ["SIDA_CACHE"] = str(tmp_path_factory.mktemp("sida-cache"))
    yield
