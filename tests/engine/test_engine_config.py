"""Checkpointer settings: ``config=`` xor keywords, and invalid options fail at construction
with ``ConfigError`` (a ``ValueError``) whose message names the option."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ckptd
from ckptd import CheckpointerConfig, ConfigError, TierConfig


def _state() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(6, dtype=torch.float32)}


def test_config_and_keywords_together_is_an_error(tmp_path: Path) -> None:
    cfg = CheckpointerConfig(uri=str(tmp_path / "run"), every=10)
    with pytest.raises(ConfigError, match=r"also given: every, keep_last\. Set them on the"):
        ckptd.Checkpointer(config=cfg, state=_state(), every=5, keep_last=2)


def test_config_with_a_different_uri_is_an_error(tmp_path: Path) -> None:
    cfg = CheckpointerConfig(uri=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="also given: uri"):
        ckptd.Checkpointer(str(tmp_path / "other"), config=cfg, state=_state())


def test_config_alone_is_used_as_given(tmp_path: Path) -> None:
    cfg = CheckpointerConfig(uri=str(tmp_path / "run"), every=2, memory_keep=0, handle_signals=False)
    state = _state()
    with ckptd.Checkpointer(config=cfg, state=state) as ck:  # the uri may be left out
        assert ck.config is cfg and ck.memory is None
        assert not ck.step(1) and ck.step(2)
    state["w"].zero_()
    with ckptd.Checkpointer(cfg.uri, config=cfg, state=state) as ck:  # or repeated, equal
        assert ck.restore() == 2
    assert torch.equal(state["w"], torch.arange(6, dtype=torch.float32))


def test_no_uri_at_all_is_an_error() -> None:
    with pytest.raises(ConfigError, match="needs a run root"):
        ckptd.Checkpointer(state=_state())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metric_mode": "maxx"}, r"metric_mode must be .min. \(losses\) or .max. \(accuracies\), got .maxx"),
        ({"every": -1}, "every must be positive, got -1"),
        ({"every": 0}, "every must be positive, got 0"),
        ({"every_seconds": float("nan")}, "every_seconds must be positive"),
        ({"every": "10"}, "every must be a positive number, got str '10'"),
        ({"keep_last": 0}, "keep_last must be positive"),
        ({"keep_best": 2}, r"keep_best needs the name of a metric \(metric=...\)"),
        ({"memory_keep": -1}, "memory_keep must be >= 0"),
        ({"catalog": "localhost:8000"}, "catalog must be an http"),
        ({"tiers": ["s3://bucket/run"]}, "tiers must be TierConfig values"),
    ],
)
def test_invalid_options_raise_config_error(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        ckptd.Checkpointer(str(tmp_path / "run"), state=_state(), **kwargs)  # type: ignore[arg-type]
    assert isinstance(err.value, ValueError)  # callers catching ValueError keep working
    assert not (tmp_path / "run").exists()  # nothing was created


def test_unknown_tier_kind_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown tier kind 'ssd' \(memory, local or remote\)"):
        TierConfig(kind="ssd", uri="/x")  # type: ignore[arg-type]


def test_a_closed_checkpointer_says_so(tmp_path: Path) -> None:
    ck = ckptd.Checkpointer(str(tmp_path / "run"), state=_state(), handle_signals=False)
    ck.close()
    with pytest.raises(ConfigError, match="this Checkpointer is closed"):
        ck.step(1)


@pytest.mark.parametrize(
    ("select", "message"),
    [
        ("best:", r"must be best:<metric>\[:min\|:max\]"),
        ("best:loss:maxx", r"must be best:<metric>\[:min\|:max\]"),
        ("step:abc", "step:<n> needs a non-negative integer"),
        (-3, "a step cannot be negative"),
        ("", "an empty selector"),
    ],
)
def test_invalid_selectors_raise_config_error(tmp_path: Path, select: str | int, message: str) -> None:
    with ckptd.Checkpointer(str(tmp_path / "run"), state=_state(), handle_signals=False) as ck:
        with pytest.raises(ConfigError, match=message):
            ck.restore(select=select)
        with pytest.raises(ConfigError, match="a step or a select, not both"):
            ck.restore(3, select="latest")


def test_missing_checkpoints_raise_not_found(tmp_path: Path) -> None:
    with ckptd.Checkpointer(str(tmp_path / "run"), state=_state(), handle_signals=False) as ck:
        ck.save(4, metrics={"loss": 1.0})
        ck.wait()
        with pytest.raises(ckptd.CheckpointNotFoundError, match="step 5 is not committed in any tier"):
            ck.restore(select="step:5")
        with pytest.raises(ckptd.CheckpointNotFoundError, match="records the metric 'acc'"):
            ck.restore(select="best:acc:max")
        with pytest.raises(ConfigError, match="aliases live in the catalog"):
            ck.restore(select="golden")
        assert ck.restore(select="best:loss") == 4
