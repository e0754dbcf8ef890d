"""Shared fixtures: the real datasets in ../shared/data and small synthetic data."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RETINA_TF_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def _require_shared() -> bool:
    return os.environ.get("RETINA_TF_REQUIRE_SHARED", "") not in ("", "0")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real datasets; skips (or fails in CI) when absent."""
    if not SHARED_DATA.is_dir():
        reason = (f"real datasets not found at {SHARED_DATA}; set RETINA_TF_SHARED_DATA "
                  "to the folder holding DRIVE/, RITE/, STARE/ and samples/")
        if _require_shared():
            pytest.fail(reason + " (RETINA_TF_REQUIRE_SHARED=1)")
        pytest.skip(reason)
    return SHARED_DATA
