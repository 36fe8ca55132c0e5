"""Key names come from one namespace; settings come from VMQ_* variables and fail naming the bad one."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from vmq.config import Settings, load_settings
from vmq.errors import ConfigError
from vmq.keys import Keys, valid_name


def every_key(keys: Keys) -> dict[str, str]:
    """Every name a Keys object can build: each property, and each builder called with sample names."""
    names = {name: getattr(keys, name) for name, attr in vars(Keys).items() if isinstance(attr, property)}
    names.update({
        "vm(web-1)": keys.vm("web-1"),
        "vm(web-2)": keys.vm("web-2"),
        "vm_restarts(web-1)": keys.vm_restarts("web-1"),
        "restart_claim(web-1, 4)": keys.restart_claim("web-1", 4),
        "restart_claim(web-1, 5)": keys.restart_claim("web-1", 5),
        "host(node1)": keys.host("node1"),
        "host_heartbeat(node1)": keys.host_heartbeat("node1"),
        "host_domains(node1)": keys.host_domains("node1"),
        "host(node2)": keys.host("node2"),
        "relay_cover(node1)": keys.relay_cover("node1"),
        "relay_cover_pending(node1)": keys.relay_cover_pending("node1"),
        "relay_cover_silent(node1)": keys.relay_cover_silent("node1"),
    })
    return names


# ---------------------------------------------------------------- keys
def test_the_key_builder_has_the_properties_these_tests_expect() -> None:
    properties = {name for name, attr in vars(Keys).items() if isinstance(attr, property)}
    assert {"probe_channel", "reply_stream", "rounds", "rounds_pending", "events", "rejects", "secrets",
            "restarts_suspended"} <= properties


@pytest.mark.parametrize("namespace", ["vmq", "prod-1", "t"])
def test_every_key_starts_with_the_namespace_and_a_colon(namespace: str) -> None:
    outside = {what: key for what, key in every_key(Keys(namespace)).items() if not key.startswith(namespace + ":")}
    assert outside == {}


def test_every_key_is_distinct() -> None:
    keys = every_key(Keys("vmq"))
    assert len(set(keys.values())) == len(keys), sorted(keys.values())


def test_two_namespaces_share_no_key() -> None:
    assert not set(every_key(Keys("a")).values()) & set(every_key(Keys("a-b")).values())


def test_the_guest_facing_names_follow_the_rule_the_responder_rebuilds() -> None:
    keys = Keys("prod")
    assert (keys.probe_channel, keys.reply_stream) == ("prod:probes", "prod:replies")


def test_the_default_namespace_is_vmq() -> None:
    assert Keys().rejects == "vmq:stats:rejects"


@pytest.mark.parametrize("name", ["web-1", "a", "0", "A.b_c-9", "x" * 128, "node1.example.org"])
def test_a_usable_name_is_valid(name: str) -> None:
    assert valid_name(name)


@pytest.mark.parametrize(
    "name",
    ["", "-web", ".web", "_web", "web:1", "web 1", "web/1", "wéb", "x" * 129, "web\t1", "\nweb"],
    ids=["empty", "leading dash", "leading dot", "leading underscore", "colon", "space", "slash", "non-ascii",
         "129 characters", "tab", "leading newline"],
)
def test_an_unusable_name_is_invalid(name: str) -> None:
    assert not valid_name(name)


def test_a_name_with_a_trailing_newline_is_invalid() -> None:
    assert not valid_name("web-1\n")


# ---------------------------------------------------------------- settings
@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No VMQ_* variable from the developer's shell leaks into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("VMQ_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_the_defaults_are_the_documented_ones(clean_env: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert (settings.probe_interval_s, settings.reply_timeout_s) == (2.0, 6.0)
    assert (settings.max_restarts, settings.restart_window_s) == (3, 3600.0)
    assert settings.namespace == "vmq"
    assert settings.keys == Keys("vmq")
    assert settings.redis_url == "redis://127.0.0.1:6379/0"


def test_environment_variables_override_the_defaults(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("VMQ_PROBE_INTERVAL_S", "0.5")
    clean_env.setenv("VMQ_REPLY_TIMEOUT_S", "1.5")
    clean_env.setenv("VMQ_MAX_RESTARTS", "5")
    clean_env.setenv("VMQ_RESTART_WINDOW_S", "600")
    clean_env.setenv("VMQ_NAMESPACE", "prod-1")
    clean_env.setenv("VMQ_REDIS_URL", "rediss://redis.example:6380/2")
    settings = load_settings()
    assert (settings.probe_interval_s, settings.reply_timeout_s) == (0.5, 1.5)
    assert (settings.max_restarts, settings.restart_window_s) == (5, 600.0)
    assert settings.keys.reply_stream == "prod-1:replies"
    assert settings.redis_url == "rediss://redis.example:6380/2"


def test_explicit_overrides_win_over_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("VMQ_MAX_RESTARTS", "5")
    assert load_settings({"max_restarts": 1}).max_restarts == 1


def test_settings_are_frozen(clean_env: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    with pytest.raises(ValidationError):
        settings.probe_interval_s = 9.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        pytest.param({"VMQ_PROBE_INTERVAL_S": "often"}, "VMQ_PROBE_INTERVAL_S", id="probe interval not a number"),
        pytest.param({"VMQ_PROBE_INTERVAL_S": "-1"}, "VMQ_PROBE_INTERVAL_S", id="negative probe interval"),
        pytest.param({"VMQ_PROBE_INTERVAL_S": "0"}, "VMQ_PROBE_INTERVAL_S", id="zero probe interval"),
        pytest.param({"VMQ_REPLY_TIMEOUT_S": "-6"}, "VMQ_REPLY_TIMEOUT_S", id="negative reply timeout"),
        pytest.param({"VMQ_MAX_RESTARTS": "-1"}, "VMQ_MAX_RESTARTS", id="negative max restarts"),
        pytest.param({"VMQ_MAX_RESTARTS": "three"}, "VMQ_MAX_RESTARTS", id="max restarts not a number"),
        pytest.param({"VMQ_MAX_RESTARTS": "2.5"}, "VMQ_MAX_RESTARTS", id="fractional max restarts"),
        pytest.param({"VMQ_BOOT_GRACE_S": "-0.1"}, "VMQ_BOOT_GRACE_S", id="negative boot grace"),
        pytest.param({"VMQ_RESTART_WINDOW_S": "0"}, "VMQ_RESTART_WINDOW_S", id="zero restart window"),
        pytest.param({"VMQ_MAX_REPLY_BYTES": "100"}, "VMQ_MAX_REPLY_BYTES", id="max reply bytes below 256"),
        pytest.param({"VMQ_PROBE_INTERVAL_S": "2", "VMQ_REPLY_TIMEOUT_S": "2"}, "VMQ_REPLY_TIMEOUT_S",
                     id="reply timeout equal to the probe interval"),
        pytest.param({"VMQ_PROBE_INTERVAL_S": "7"}, "VMQ_REPLY_TIMEOUT_S",
                     id="reply timeout shorter than the probe interval"),
        pytest.param({"VMQ_NAMESPACE": "vmq:prod"}, "VMQ_NAMESPACE", id="namespace with a colon"),
        pytest.param({"VMQ_NAMESPACE": ""}, "VMQ_NAMESPACE", id="empty namespace"),
        pytest.param({"VMQ_HOST_NAME": "node 1"}, "VMQ_HOST_NAME", id="host name with a space"),
        pytest.param({"VMQ_REDIS_URL": "http://127.0.0.1:6379"}, "VMQ_REDIS_URL", id="redis url with http scheme"),
        pytest.param({"VMQ_REDIS_URL": "127.0.0.1:6379"}, "VMQ_REDIS_URL", id="redis url without a scheme"),
    ],
)
def test_a_bad_value_fails_at_startup_naming_the_variable(clean_env: pytest.MonkeyPatch, env: dict[str, str],
                                                          variable: str) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert variable in str(caught.value)


def test_a_bad_override_names_the_variable_too(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="VMQ_PROBE_INTERVAL_S"):
        load_settings({"probe_interval_s": -2})


def test_a_too_short_reply_timeout_names_both_timeouts(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"probe_interval_s": 3, "reply_timeout_s": 1})
    assert "VMQ_REPLY_TIMEOUT_S" in str(caught.value) and "VMQ_PROBE_INTERVAL_S" in str(caught.value)


def test_a_bad_redis_url_is_not_echoed_with_its_password(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("VMQ_REDIS_URL", "http://admin:s3cret-pw@redis.example:6379")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "VMQ_REDIS_URL" in str(caught.value)
    assert "s3cret-pw" not in str(caught.value)


def test_every_problem_is_reported_at_once(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("VMQ_NAMESPACE", "a b")
    clean_env.setenv("VMQ_MAX_RESTARTS", "-3")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "VMQ_NAMESPACE" in str(caught.value) and "VMQ_MAX_RESTARTS" in str(caught.value)


def test_a_host_worker_without_a_host_name_is_refused_naming_vmq_host_name(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="VMQ_HOST_NAME"):
        load_settings().require_host()
    assert load_settings({"host_name": "node1"}).require_host() == "node1"


def test_settings_are_a_pydantic_settings_object_with_the_vmq_prefix() -> None:
    assert Settings.model_config.get("env_prefix") == "VMQ_"
