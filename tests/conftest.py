"""Fixtures shared by several test directories."""

from __future__ import annotations

import pytest


@pytest.fixture
def library_bars_on(recwarn):
    """transformers' progress bars switched on for the test, their previous state restored after.

    Skips where transformers has no ``set_tqdm_hook`` (its bars then stay its own). A test
    redirects ``sys.stderr`` in its own body: pytest's capture replaces it again between a
    fixture's setup and the test. recwarn: huggingface_hub's warning that
    HF_HUB_DISABLE_PROGRESS_BARS=1 keeps its own bars off is recorded, not printed."""
    from transformers.utils import logging as hf_logging

    if not hasattr(hf_logging, "set_tqdm_hook"):
        pytest.skip("this transformers has no set_tqdm_hook: its bars stay its own")
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # HF_HUB_DISABLE_PROGRESS_BARS=1 would start transformers' bars off
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()
