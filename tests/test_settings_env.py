"""Settings read from RLM_* variables without pydantic-settings: the same
rules as before (prefix, any case, text converted by the field's type,
keyword overrides on top, unknown variables ignored, a bad value named by
its variable)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from activities.settings import load_settings, settings_from_env
from cli._errors import describe


def test_variables_by_field_in_any_case_and_unknown_ones_ignored():
    environ = {"RLM_S3_BUCKET": "b", "rlm_temporal_ui_port": "9999", "RLM_NO_SUCH_FIELD": "x", "S3_BUCKET": "no"}
    assert settings_from_env(environ) == {"s3_bucket": "b", "temporal_ui_port": "9999"}


def test_text_is_converted_and_overrides_win(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("RLM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("RLM_S3_SECURE", "true")
    monkeypatch.setenv("RLM_GUEST_MEMORY_SHARE", "0.25")
    monkeypatch.setenv("RLM_TASK_QUEUE", "from-env")
    settings = load_settings(task_queue="override")
    assert settings.data_dir == tmp_path and settings.s3_secure is True
    assert settings.guest_memory_share == 0.25 and settings.task_queue == "override"


def test_a_bad_value_names_its_variable(monkeypatch):
    monkeypatch.setenv("RLM_TEMPORAL_UI_PORT", "not-a-port")
    with pytest.raises(ValidationError) as caught:
        load_settings()
    assert describe(caught.value).startswith("invalid settings: RLM_TEMPORAL_UI_PORT:")
