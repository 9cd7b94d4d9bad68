"""The relay's guards for a public address: events per run and minute, a token on the codec."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from common.settings import Settings
from relay.app import RunEventRate, check_codec_exposure


def test_a_run_gets_its_allowance_per_minute_and_other_runs_are_unaffected() -> None:
    rate = RunEventRate(per_minute=3)
    assert [rate.admit("run-a", t) for t in (0.0, 1.0, 2.0)] == [None, None, None]
    wait = rate.admit("run-a", 3.0)
    assert wait == pytest.approx(57.0)
    assert rate.admit("run-b", 3.0) is None
    assert rate.admit("run-a", 60.5) is None  # the first event left the window


def test_codec_routes_beyond_loopback_need_a_token(settings: Settings) -> None:
    check_codec_exposure(settings.model_copy(update={"relay_host": "127.0.0.1"}))
    with pytest.raises(RuntimeError, match="LORA_CODEC_AUTH_TOKEN"):
        check_codec_exposure(settings.model_copy(update={"relay_host": "0.0.0.0"}))
    check_codec_exposure(
        settings.model_copy(
            update={"relay_host": "0.0.0.0", "codec_auth_token": SecretStr("t" * 32)}
        )
    )
