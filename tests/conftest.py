"""Fixtures shared across test files."""

import pytest


@pytest.fixture(scope="session")
def deploy_consortium(tmp_path_factory):
    """One loopback consortium of real processes for all deployment tests (tests/deploy_helpers.py)."""
    from deploy_helpers import shared_consortium

    yield from shared_consortium(tmp_path_factory.mktemp("consortium"))
