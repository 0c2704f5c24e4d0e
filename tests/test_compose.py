"""Configuration: the settings object, and docker-compose.yml agreeing with it.

Docker cannot run here, so the compose file is parsed and checked against
the code: the worker's RLM_* variables are real settings, host ports match
the settings' defaults, the bucket and search attributes are the code's.
"""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from activities.settings import Settings, load_settings
from cli._seaweed_server import ensure_credentials
from workflows.names import SEARCH_ATTRIBUTES, TASK_QUEUE_DEFAULT

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture
def defaults(tmp_path: Path) -> Settings:
    """Default settings, unaffected by RLM_* variables of the environment."""
    values = {name: f.get_default(call_default_factory=True) for name, f in Settings.model_fields.items()}
    return Settings(**values | {"data_dir": tmp_path})


def _host_ports(service: dict) -> dict[int, tuple[str, int]]:
    """container port -> (host ip, host port)."""
    ports = {}
    for spec in service.get("ports", []):
        ip, host, container = str(spec).split(":")
        ports[int(container)] = (ip, int(host))
    return ports


def test_compose_has_the_production_stack(compose: dict) -> None:
    services = compose["services"]
    assert {"postgresql", "temporal", "temporal-ui", "minio", "minio-init", "worker"} <= set(services)
    assert services["temporal"]["environment"]["DB"].startswith("postgres")
    assert services["temporal"]["environment"]["POSTGRES_SEEDS"] == "postgresql"
    assert "postgresql-data:/var/lib/postgresql/data" in services["postgresql"]["volumes"]
    assert "minio-data:/data" in services["minio"]["volumes"]
    assert set(compose["volumes"]) >= {"postgresql-data", "minio-data"}


def test_worker_is_scalable_and_built_from_the_repo(compose: dict) -> None:
    worker = compose["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker
    assert worker["build"] == "."
    assert (ROOT / "Dockerfile").is_file()
    assert worker["command"] == ["rlm", "worker"]


def test_worker_settings_are_real_settings_and_parse(compose: dict, defaults: Settings) -> None:
    env = compose["services"]["worker"]["environment"]
    rlm_env = {k: str(v) for k, v in env.items() if k.startswith("RLM_")}
    fields = {f"RLM_{name.upper()}" for name in Settings.model_fields}
    assert set(rlm_env) <= fields, f"unknown settings: {set(rlm_env) - fields}"
    # The values (with compose's ${VAR...} defaults filled in) are valid settings.
    concrete = {k: re.sub(r"\$\{[^}]*\}", "x", v) for k, v in rlm_env.items()}
    parsed = Settings(**{k.removeprefix("RLM_").lower(): v for k, v in concrete.items()})
    assert parsed.s3_bucket == defaults.s3_bucket
    assert parsed.task_queue == TASK_QUEUE_DEFAULT
    assert parsed.temporal_address == "temporal:7233" and parsed.s3_endpoint == "minio:9000"


def test_host_ports_match_setting_defaults_on_loopback(compose: dict, defaults: Settings) -> None:
    services = compose["services"]
    temporal = _host_ports(services["temporal"])
    assert temporal[7233] == ("127.0.0.1", defaults.temporal_port)
    ui = _host_ports(services["temporal-ui"])
    assert ui[8080] == ("127.0.0.1", defaults.temporal_ui_port)
    assert defaults.temporal_ui_url == f"http://127.0.0.1:{ui[8080][1]}"
    minio = _host_ports(services["minio"])
    assert minio[9000] == ("127.0.0.1", defaults.s3_port)


def test_bucket_and_search_attributes_match_the_code(compose: dict, defaults: Settings) -> None:
    init = compose["services"]["minio-init"]["command"][0]
    assert f"rlm/{defaults.s3_bucket}" in init
    setup = compose["services"]["temporal-setup"]["command"][0]
    assert dict(re.findall(r"^ensure (\w+) (\w+)$", setup, re.M)) == SEARCH_ATTRIBUTES


def test_dynamic_config_raises_update_limits(compose: dict) -> None:
    config = yaml.safe_load(compose["configs"]["temporal-dynamic-config"]["content"])
    from cli._temporal_server import DYNAMIC_CONFIG

    assert {key: config[key][0]["value"] for key in DYNAMIC_CONFIG} == DYNAMIC_CONFIG
    target = compose["services"]["temporal"]["configs"][0]["target"]
    assert target.endswith(compose["services"]["temporal"]["environment"]["DYNAMIC_CONFIG_FILE_PATH"])


# ---- the settings object ------------------------------------------------


def test_env_prefix_and_overrides(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RLM_S3_BUCKET", "from-env")
    monkeypatch.setenv("RLM_TEMPORAL_UI_PORT", "9999")
    monkeypatch.setenv("RLM_DATA_DIR", str(tmp_path))
    settings = load_settings(task_queue="override")
    assert (settings.s3_bucket, settings.task_queue) == ("from-env", "override")
    assert settings.temporal_ui_url == "http://127.0.0.1:9999"


def test_to_env_round_trips_through_the_environment(monkeypatch, tmp_path: Path) -> None:
    original = load_settings(
        data_dir=tmp_path, s3_access_key="ak", s3_secret_key="sk", s3_secure=True, temporal_ui_port=1234
    )
    env = original.to_env()
    assert env["RLM_S3_SECRET_KEY"] == "sk" and env["RLM_S3_SECURE"] == "true"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert load_settings() == original


def test_credentials_come_from_the_file_rlm_up_writes(defaults: Settings) -> None:
    assert defaults.s3_credentials() is None
    written = ensure_credentials(defaults)
    assert stat.S_IMODE(defaults.credentials_file.stat().st_mode) == 0o600
    assert defaults.s3_credentials() == written
    assert ensure_credentials(defaults) == written  # generated once
    assert json.loads(defaults.credentials_file.read_text())["access_key"] == written[0]
    assert defaults.to_env()["RLM_S3_ACCESS_KEY"] == written[0]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("s3_endpoint", "http://minio:9000", "without a scheme"),
        ("s3_endpoint", "minio", "not host:port"),
        ("temporal_address", "temporal:notaport", "not host:port"),
    ],
)
def test_bad_addresses_name_the_variable(field: str, value: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        load_settings(**{field: value})
