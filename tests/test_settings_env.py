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


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        # `rlm up` died with bind()'s OverflowError traceback on these.
        ("RLM_TEMPORAL_UI_PORT", "99999", "less than or equal to 65535"),
        ("RLM_SEAWEED_PORT_BASE", "70000", "less than or equal to 65527"),
        ("RLM_LOCAL_MODEL_PORT", "0", "greater than or equal to 1"),
        # Taken without a word: an empty task queue (no worker can poll it, no run can start
        # on it), a log level nobody has (read as "info").
        ("RLM_TASK_QUEUE", "", "at least 1 character"),
        ("RLM_TEMPORAL_NAMESPACE", "", "at least 1 character"),
        ("RLM_LOG_LEVEL", "loud", "'loud' is not a log level: one of debug, info, warning, error, critical"),
        # The S3 client raised a bare ValueError (a traceback) at first use.
        ("RLM_S3_BUCKET", "", "'' is not an S3 bucket name: 3 to 63 lowercase letters"),
        ("RLM_S3_BUCKET", "Audit_Files", "'Audit_Files' is not an S3 bucket name"),
        ("RLM_TEMPORAL_GRPC_COMPRESSION", "zstd", "'zstd' is not a gRPC compression: one of auto, gzip, none"),
    ],
)
def test_a_value_no_service_can_use_is_refused_naming_its_variable(monkeypatch, variable, value, says):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as caught:
        load_settings()
    message = describe(caught.value)
    assert message.startswith(f"invalid settings: {variable}:") and says in message, message


def test_a_log_level_in_any_case_is_taken(monkeypatch):
    monkeypatch.setenv("RLM_LOG_LEVEL", "WARNING")
    assert load_settings().log_level == "warning"


@pytest.mark.parametrize(
    ("address", "setting", "gzip"),
    [
        # "auto": no compression to a server on this machine, gzip to any other.
        ("127.0.0.1:7233", "auto", False),
        ("localhost:7233", "auto", False),
        ("[::1]:7233", "auto", False),
        ("temporal:7233", "auto", True),
        ("127.0.0.1.example.com:7233", "auto", True),
        ("10.0.0.5:7233", "auto", True),
        # Chosen: as said, in any case.
        ("127.0.0.1:7233", "GZIP", True),
        ("temporal:7233", "none", False),
    ],
)
def test_grpc_compression_is_off_on_loopback_unless_chosen(monkeypatch, address, setting, gzip):
    monkeypatch.setenv("RLM_TEMPORAL_ADDRESS", address)
    monkeypatch.setenv("RLM_TEMPORAL_GRPC_COMPRESSION", setting)
    assert load_settings().temporal_gzip is gzip
