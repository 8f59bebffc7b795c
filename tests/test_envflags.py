"""The environment switches: one parser for all three (`dtm.envflags`)."""

from __future__ import annotations

import pytest

from dtm.envflags import CHUNKED_LOSS, MERGE_KERNELS, SEEDS_SEQUENTIAL, env_flag
from dtm.errors import ConfigError
from dtm.merging import kernels
from dtm.pipeline import SEQUENTIAL_ENV
from dtm.training.chunked_loss import ENV_SWITCH, chunked_loss_enabled


@pytest.mark.parametrize("raw, value", [("1", True), ("true", True), (" YES ", True), ("On", True),
                                        ("0", False), ("false", False), ("No", False), ("OFF ", False)])
def test_yes_and_no_in_any_case(monkeypatch, raw, value):
    monkeypatch.setenv("DTM_SOME_SWITCH", raw)
    assert env_flag("DTM_SOME_SWITCH", default=not value) is value


@pytest.mark.parametrize("default", [True, False])
def test_unset_or_empty_is_the_default(monkeypatch, default):
    monkeypatch.delenv("DTM_SOME_SWITCH", raising=False)
    assert env_flag("DTM_SOME_SWITCH", default) is default
    monkeypatch.setenv("DTM_SOME_SWITCH", "  ")
    assert env_flag("DTM_SOME_SWITCH", default) is default


def test_anything_else_is_an_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv("DTM_SOME_SWITCH", "maybe")
    with pytest.raises(ConfigError, match=r"DTM_SOME_SWITCH='maybe'.*1 or 0"):
        env_flag("DTM_SOME_SWITCH", default=True)


def test_the_three_switches_read_the_same_way(monkeypatch):
    assert (ENV_SWITCH, kernels.KERNELS_ENV, SEQUENTIAL_ENV) == (CHUNKED_LOSS, MERGE_KERNELS, SEEDS_SEQUENTIAL)
    monkeypatch.setenv(CHUNKED_LOSS, "False")
    assert not chunked_loss_enabled()
    monkeypatch.setenv(MERGE_KERNELS, "False")  # was read case-sensitively: "False" left the kernels on
    assert kernels._turned_off()
    monkeypatch.setenv(MERGE_KERNELS, "1")
    assert not kernels._turned_off()
