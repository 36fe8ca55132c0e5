"""Redis Sentinel settings: the central processes' VMQ_REDIS_SENTINELS and the responder's `sentinels`."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmq.config import load_settings
from vmq.errors import ConfigError
from vmq.responder import ConfigProblem, load_config
from workers.app import create_app

SECRET = "ab" * 32


def test_without_sentinels_celery_uses_the_redis_url_itself() -> None:
    settings = load_settings({"redis_url": "redis://vmq:pw@10.0.0.5:6379/2"})
    assert settings.sentinel_addresses == []
    assert settings.celery_url == "redis://vmq:pw@10.0.0.5:6379/2"


def test_with_sentinels_celery_gets_one_sentinel_url_per_sentinel_with_the_credentials_and_db() -> None:
    settings = load_settings({"redis_url": "redis://vmq:p%40ss@ignored:6379/2",
                              "redis_sentinels": "10.0.0.1:26379, 10.0.0.2:26380", "redis_sentinel_master": "ha"})
    assert settings.sentinel_addresses == [("10.0.0.1", 26379), ("10.0.0.2", 26380)]
    assert settings.celery_url == "sentinel://vmq:p%40ss@10.0.0.1:26379/2;sentinel://vmq:p%40ss@10.0.0.2:26380/2"
    app = create_app(settings)
    assert app.conf.broker_transport_options["master_name"] == "ha"
    assert app.conf.result_backend_transport_options == {"master_name": "ha"}
    assert app.conf.result_backend == settings.celery_url


@pytest.mark.parametrize(("changes", "named"), [
    ({"redis_sentinels": "10.0.0.1"}, "VMQ_REDIS_SENTINELS"),
    ({"redis_sentinels": "10.0.0.1:notaport"}, "VMQ_REDIS_SENTINELS"),
    ({"redis_sentinels": "10.0.0.1:26379", "redis_url": "unix:///run/redis.sock"}, "VMQ_REDIS_URL"),
])
def test_a_bad_sentinel_setting_fails_at_startup_naming_the_variable(changes: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(changes)


def test_the_responder_reads_sentinels_from_its_file_or_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "responder.toml"
    path.write_text(f'vm_id = "web-1"\nredis_url = "redis://guest:pw@ignored/0"\nsecret_key = "{SECRET}"\n'
                    'sentinels = ["10.0.0.1:26379", "10.0.0.2:26379"]\nsentinel_master = "ha"\n')
    config = load_config(str(path), {})
    assert config.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379)) and config.sentinel_master == "ha"
    config = load_config(str(path), {"VMQ_SENTINELS": "10.0.0.9:26379"})
    assert config.sentinels == (("10.0.0.9", 26379),)


def test_the_responder_refuses_a_sentinel_that_is_not_host_port(tmp_path: Path) -> None:
    path = tmp_path / "responder.toml"
    path.write_text(f'vm_id = "web-1"\nredis_url = "redis://h/0"\nsecret_key = "{SECRET}"\nsentinels = ["x"]\n')
    with pytest.raises(ConfigProblem, match="sentinels"):
        load_config(str(path), {})
