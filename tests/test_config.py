from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from securemsg.config import (
    FIELD_HELP,
    ClientConfig,
    ServerConfig,
    add_config_flags,
    fields_with_defaults,
    load_config,
    overrides_from_args,
    read_token,
)
from securemsg.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parent.parent / "config"


def write_toml(tmp_path: Path, text: str, name: str = "securemsg.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(**kwargs: object) -> str:
    """The message of the ConfigError that load_config(ServerConfig, ...) raises."""
    kwargs.setdefault("env", {})
    with pytest.raises(ConfigError) as info:
        load_config(ServerConfig, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


# -- merging ---------------------------------------------------------------------------------


def test_nothing_given_means_the_defaults() -> None:
    assert load_config(ServerConfig, env={}) == ServerConfig()
    assert load_config(ClientConfig, env={}) == ClientConfig()


def test_flag_beats_environment_beats_file_beats_default(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        '[server]\nheartbeat_interval = 20.0\nport = 8000\nlog_level = "debug"\n',
    )
    env = {"SECUREMSG_HEARTBEAT_INTERVAL": "15", "SECUREMSG_PORT": "9000"}
    config = load_config(
        ServerConfig, path=path, env=env, overrides={"heartbeat_interval": 12.0, "host": None}
    )
    assert config.heartbeat_interval == 12.0  # flag
    assert config.port == 9000  # environment
    assert config.log_level == "debug"  # file
    assert config.host == "127.0.0.1"  # default: a None override is "not given"


def test_values_are_converted_to_the_field_types(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[server]\nheartbeat_interval = 5\n")
    config = load_config(ServerConfig, path=path, env={"SECUREMSG_MAX_FRAME": " 2048 "})
    assert config.heartbeat_interval == 5.0
    assert isinstance(config.heartbeat_interval, float)
    assert config.max_frame == 2048


def test_max_depth_is_read_from_file_environment_and_flag(tmp_path: Path) -> None:
    assert ServerConfig().max_depth == 64
    path = write_toml(tmp_path, "[server]\nmax_depth = 32\n")
    assert load_config(ServerConfig, path=path, env={}).max_depth == 32
    env = {"SECUREMSG_MAX_DEPTH": "16"}
    assert load_config(ServerConfig, path=path, env=env).max_depth == 16
    config = load_config(ServerConfig, path=path, env=env, overrides={"max_depth": 8})
    assert config.max_depth == 8
    parser = argparse.ArgumentParser()
    add_config_flags(parser, ServerConfig)
    args = parser.parse_args(["--max-depth", "100"])
    assert overrides_from_args(args, ServerConfig) == {"max_depth": 100}


def test_empty_and_unrelated_environment_variables_are_ignored() -> None:
    env = {"SECUREMSG_PORT": "", "SECUREMSG_NAME": "alice", "SECUREMSG_TIME_FACTOR": "3"}
    assert load_config(ServerConfig, env=env) == ServerConfig()


def test_a_file_may_hold_both_tables(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[server]\nport = 1\n\n[client]\nport = 2\n")
    assert load_config(ServerConfig, path=path, env={}).port == 1
    assert load_config(ClientConfig, path=path, env={}).port == 2
    only_client = write_toml(tmp_path, "[client]\nport = 2\n", name="client.toml")
    assert load_config(ServerConfig, path=only_client, env={}) == ServerConfig()


@pytest.mark.parametrize("text", ["1", "true", "TRUE", "yes", "on", " On "])
def test_environment_booleans_accept_the_usual_words_for_true(text: str) -> None:
    env = {"SECUREMSG_REQUIRE_CLIENT_CERT": text}
    assert load_config(ServerConfig, env=env).require_client_cert is True


@pytest.mark.parametrize("text", ["0", "false", "False", "no", "off"])
def test_environment_booleans_accept_the_usual_words_for_false(text: str) -> None:
    env = {"SECUREMSG_TLS13_ONLY": text}
    assert load_config(ServerConfig, path=None, env=env).tls13_only is False


@given(port=st.integers(0, 65535), interval=st.floats(0.001, 1e6))
def test_environment_numbers_round_trip(port: int, interval: float) -> None:
    env = {
        "SECUREMSG_PORT": str(port),
        "SECUREMSG_HEARTBEAT_INTERVAL": repr(interval),
        "SECUREMSG_HEARTBEAT_TIMEOUT": repr(interval * 3),
    }
    config = load_config(ServerConfig, env=env)
    assert (config.port, config.heartbeat_interval) == (port, interval)


# -- errors name the key, where it came from and what is expected -----------------------------


def test_unknown_key_in_the_file_suggests_the_right_one(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[server]\nheartbeat_intervall = 5.0\n")
    assert config_error(path=path) == (
        f"{path}: unknown key 'heartbeat_intervall' in [server] "
        "(did you mean 'heartbeat_interval'?)"
    )


def test_a_client_key_in_the_server_table_is_unknown(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[server]\nreconnect_cap = 5.0\n")
    assert config_error(path=path).startswith(f"{path}: unknown key 'reconnect_cap' in [server]")


def test_unknown_tables_and_top_level_keys_are_errors(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[sever]\nport = 1\n")
    message = config_error(path=path)
    assert message.startswith(f"{path}: unknown table [sever]")
    assert "(did you mean 'server'?)" in message
    path = write_toml(tmp_path, "port = 1\n")
    assert config_error(path=path).startswith(f"{path}: unknown top-level key 'port'")
    path = write_toml(tmp_path, "server = 1\n")
    assert config_error(path=path) == f"{path}: 'server' must be a table ([server]), got 1"


def test_wrong_type_in_the_file_names_file_key_and_type(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[server]\nport = "abc"\n')
    assert config_error(path=path) == (
        f"{path}: expected an integer for 'port' in [server], got 'abc'"
    )
    path = write_toml(tmp_path, "[server]\nmax_frame = 1.5\n")
    assert "expected an integer for 'max_frame'" in config_error(path=path)
    path = write_toml(tmp_path, "[server]\ntls13_only = 1\n")
    assert config_error(path=path) == (
        f"{path}: expected true or false for 'tls13_only' in [server], got 1"
    )
    path = write_toml(tmp_path, '[server]\nlog_format = "xml"\n')
    assert config_error(path=path) == (
        f"{path}: expected one of 'auto', 'json', 'console' for 'log_format' in [server], got 'xml'"
    )


def test_wrong_type_in_the_environment_names_the_variable() -> None:
    assert config_error(env={"SECUREMSG_PORT": "abc"}) == (
        "SECUREMSG_PORT: expected an integer, got 'abc'"
    )
    assert config_error(env={"SECUREMSG_HEARTBEAT_INTERVAL": "fast"}) == (
        "SECUREMSG_HEARTBEAT_INTERVAL: expected a number, got 'fast'"
    )
    assert config_error(env={"SECUREMSG_TLS13_ONLY": "maybe"}) == (
        "SECUREMSG_TLS13_ONLY: expected a boolean (1/0, true/false, yes/no or on/off), got 'maybe'"
    )
    assert config_error(env={"SECUREMSG_LOG_LEVEL": "loud"}) == (
        "SECUREMSG_LOG_LEVEL: expected one of 'debug', 'info', 'warning', 'error', "
        "'critical', got 'loud'"
    )


def test_wrong_type_or_unknown_name_in_overrides_names_the_flag() -> None:
    assert config_error(overrides={"port": "abc"}) == "--port: expected an integer, got 'abc'"
    assert config_error(overrides={"heartbeat_intervall": 1.0}) == (
        "--heartbeat-intervall: unknown server option 'heartbeat_intervall' "
        "(did you mean 'heartbeat_interval'?)"
    )


def test_heartbeat_timeout_must_exceed_the_interval() -> None:
    assert config_error(overrides={"heartbeat_timeout": 1.0}) == (
        "--heartbeat-timeout: heartbeat_timeout (1.0) must be greater than "
        "heartbeat_interval (10.0)"
    )
    assert config_error(env={"SECUREMSG_HEARTBEAT_TIMEOUT": "10"}) == (
        "SECUREMSG_HEARTBEAT_TIMEOUT: heartbeat_timeout (10.0) must be greater than "
        "heartbeat_interval (10.0)"
    )


def test_a_cross_field_error_blames_the_strongest_source(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[server]\nheartbeat_interval = 40.0\n")
    assert config_error(path=path) == (
        f"{path}: heartbeat_timeout (30.0) must be greater than heartbeat_interval (40.0)"
    )
    env = {"SECUREMSG_HEARTBEAT_TIMEOUT": "35"}
    assert config_error(path=path, env=env).startswith("SECUREMSG_HEARTBEAT_TIMEOUT: ")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"port": 70000}, "--port: port must be between 0 and 65535, got 70000"),
        (
            {"handshake_timeout": 0.0},
            "--handshake-timeout: handshake_timeout must be a number of seconds greater "
            "than 0, got 0.0",
        ),
        (
            {"session_ttl": float("nan")},
            "--session-ttl: session_ttl must be a number of seconds greater than 0, got nan",
        ),
        ({"max_frame": 0}, "--max-frame: max_frame must be at least 1, got 0"),
        ({"max_depth": 0}, "--max-depth: max_depth must be between 1 and 256, got 0"),
        ({"max_depth": 257}, "--max-depth: max_depth must be between 1 and 256, got 257"),
        (
            {"busy_poll_us": 1001},
            "--busy-poll-us: busy_poll_us must be between 0 (off) and 1000, got 1001",
        ),
        (
            {"busy_poll_us": -1},
            "--busy-poll-us: busy_poll_us must be 0 (off) or more, got -1",
        ),
        (
            {"max_msgs_per_sec": -1.0},
            "--max-msgs-per-sec: max_msgs_per_sec must be 0 (no limit) or more, got -1.0",
        ),
    ],
)
def test_out_of_range_values_are_errors(overrides: dict[str, object], message: str) -> None:
    assert config_error(overrides=overrides) == message


def test_client_rules() -> None:
    def error(**overrides: object) -> str:
        with pytest.raises(ConfigError) as info:
            load_config(ClientConfig, env={}, overrides=overrides)
        return str(info.value)

    assert error(reconnect_base=5.0, reconnect_cap=1.0) == (
        "--reconnect-cap: reconnect_cap (1.0) must be at least reconnect_base (5.0)"
    )
    assert error(port=0) == "--port: port must be between 1 and 65535, got 0"
    assert error(name="no spaces").startswith("--name: name must be 1 to 64 letters")
    assert error(heartbeat_interval=10.0, heartbeat_timeout=5.0) == (
        "--heartbeat-timeout: heartbeat_timeout (5.0) must be greater than "
        "heartbeat_interval (10.0)"
    )
    # Only one heartbeat value given: the other comes from the server, nothing to compare.
    assert load_config(ClientConfig, env={}, overrides={"heartbeat_interval": 60.0})


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ConfigError, match=r"^port must be between 0 and 65535, got -1$"):
        ServerConfig(port=-1)


def test_the_metrics_and_monitoring_settings_are_checked_and_blamed_on_their_source() -> None:
    def error(**env: str) -> str:
        with pytest.raises(ConfigError) as info:
            load_config(ServerConfig, env=env)
        return str(info.value)

    assert error(SECUREMSG_METRICS_PORT="70000") == (
        "SECUREMSG_METRICS_PORT: metrics_port must be between 0 and 65535, got 70000"
    )
    assert error(SECUREMSG_LOOP_STALL_THRESHOLD="-1") == (
        "SECUREMSG_LOOP_STALL_THRESHOLD: loop_stall_threshold must be 0 (off) or more, got -1.0"
    )
    assert error(SECUREMSG_PORT="70000").startswith("SECUREMSG_PORT: port must be between")
    config = load_config(
        ServerConfig, env={"SECUREMSG_METRICS_PORT": "9464", "SECUREMSG_METRICS_HOST": "::1"}
    )
    assert (config.metrics_port, config.metrics_host) == (9464, "::1")
    assert ServerConfig().metrics_port is None  # off by default


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert config_error(path=path) == f"{path}: config file not found"


def test_unreadable_file_is_an_error(tmp_path: Path) -> None:
    assert config_error(path=tmp_path).startswith(f"{tmp_path}: cannot read config file (")
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# caf\xe9\n")
    assert config_error(path=path) == f"{path}: config file is not UTF-8 text"


def test_toml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[server]\nport 7443\n")
    message = config_error(path=path)
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "line 2" in message


# -- the example files -----------------------------------------------------------------------


@pytest.mark.parametrize("cls", [ServerConfig, ClientConfig])
def test_example_file_loads_to_the_defaults(cls: type[ServerConfig | ClientConfig]) -> None:
    path = EXAMPLES / f"{cls.section}.toml"
    assert load_config(cls, path=path, env={}) == cls()


@pytest.mark.parametrize("cls", [ServerConfig, ClientConfig])
def test_example_file_mentions_every_key(cls: type[ServerConfig | ClientConfig]) -> None:
    text = (EXAMPLES / f"{cls.section}.toml").read_text(encoding="utf-8")
    for name, _default, _help in fields_with_defaults(cls):
        assert re.search(rf"^(# )?{name}( =|:)", text, re.MULTILINE), name


# -- the token -------------------------------------------------------------------------------


def test_token_is_masked_in_repr_and_str() -> None:
    config = load_config(ClientConfig, env={"SECUREMSG_TOKEN": "s3cr3t-value"})
    assert config.token == "s3cr3t-value"
    for text in (repr(config), str(config), repr(config.__rich_repr__())):
        assert "s3cr3t-value" not in text
    assert "token='***'" in repr(config)
    assert "token=None" in repr(ClientConfig())


def test_read_token_prefers_the_token_then_the_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("  from-file\n", encoding="utf-8")
    assert read_token(ServerConfig(token_file=str(token_file))) == "from-file"
    assert read_token(ServerConfig(token="direct", token_file=str(token_file))) == "direct"
    assert read_token(ClientConfig(token=" t ")) == "t"
    assert read_token(ServerConfig()) is None


def test_read_token_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError, match=r"^token_file '.*missing': file not found$"):
        read_token(ServerConfig(token_file=str(missing)))
    empty = tmp_path / "empty"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="the file is empty"):
        read_token(ServerConfig(token_file=str(empty)))


# -- flags -----------------------------------------------------------------------------------


def server_parser(**kwargs: object) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="securemsg serve")
    add_config_flags(parser, ServerConfig, **kwargs)  # type: ignore[arg-type]
    return parser


def test_flags_set_only_what_was_given() -> None:
    parser = server_parser()
    argv = "--heartbeat-interval 2.5 --require-client-cert --no-tls13-only --port 9000"
    args = parser.parse_args([*argv.split(), "--log-level", "debug"])
    overrides = overrides_from_args(args, ServerConfig)
    assert overrides == {
        "heartbeat_interval": 2.5,
        "require_client_cert": True,
        "tls13_only": False,
        "port": 9000,
        "log_level": "debug",
    }
    assert overrides_from_args(parser.parse_args([]), ServerConfig) == {}
    config = load_config(ServerConfig, env={"SECUREMSG_PORT": "1"}, overrides=overrides)
    assert (config.port, config.heartbeat_interval, config.require_client_cert) == (
        9000,
        2.5,
        True,
    )


def test_flags_work_in_an_argument_group_and_honour_exclude() -> None:
    parser = argparse.ArgumentParser()
    group = parser.add_argument_group("client")
    add_config_flags(group, ClientConfig, exclude={"log_level", "log_format"})
    args = parser.parse_args(["--reconnect-cap", "9", "--name", "alice"])
    assert overrides_from_args(args, ClientConfig) == {"reconnect_cap": 9.0, "name": "alice"}
    with pytest.raises(SystemExit):
        parser.parse_args(["--log-level", "debug"])


def test_the_token_flag_is_refused_and_hidden(capsys: pytest.CaptureFixture[str]) -> None:
    parser = server_parser()
    assert "--token " not in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--token", "s3cr3t"])  # not taken as an abbreviated --token-file
    err = capsys.readouterr().err
    assert "argument --token: a secret on the command line is visible" in err
    assert "set SECUREMSG_TOKEN instead" in err
    assert "s3cr3t" not in err


def test_flag_help_shows_the_default() -> None:
    text = " ".join(server_parser().format_help().split())
    assert "--heartbeat-interval SECONDS seconds between heartbeats" in text
    assert "(default: 10.0)" in text
    assert "--require-client-cert, --no-require-client-cert" in text


def test_fields_with_defaults_lists_every_field_with_help() -> None:
    for cls in (ServerConfig, ClientConfig):
        rows = fields_with_defaults(cls)
        assert [name for name, _, _ in rows] == list(cls.__struct_fields__)
        assert set(FIELD_HELP[cls.section]) == set(cls.__struct_fields__)
        defaults = cls()
        for name, default, help_text in rows:
            assert default == getattr(defaults, name)
            assert help_text


@pytest.mark.parametrize("value", ['["s3cr3t-value"]', "{ secret = 's3cr3t-value' }"])
def test_a_token_of_the_wrong_type_is_not_echoed(tmp_path: Path, value: str) -> None:
    path = tmp_path / "server.toml"
    path.write_text(f"[server]\ntoken = {value}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(ServerConfig, path=path, env={})
    assert "s3cr3t" not in str(info.value)
    assert "'token'" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(ClientConfig, env={}, overrides={"token": ["s3cr3t-value"]})
    assert "s3cr3t" not in str(info.value)


# -- the cluster -----------------------------------------------------------------------------


def test_the_cluster_comes_from_the_environment_and_its_password_is_never_shown() -> None:
    env = {"SECUREMSG_CLUSTER": "nats://a:4222,nats://b:4222", "SECUREMSG_CLUSTER_PASSWORD": "pw1"}
    config = load_config(ServerConfig, env=env, overrides={"cluster_user": "node"})
    assert (config.cluster, config.cluster_user) == ("nats://a:4222,nats://b:4222", "node")
    assert "pw1" not in repr(config) and "cluster_password='***'" in repr(config)


def test_the_cluster_password_flag_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        server_parser().parse_args(["--cluster-password", "pw1"])
    assert "set SECUREMSG_CLUSTER_PASSWORD instead" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (
            {"cluster": "nats://a:4222", "store": "s.db"},
            "--store: store and cluster cannot be used together: in a cluster JetStream keeps"
            " the sessions, so leave store out",
        ),
        (
            {"cluster": "http://a:4222"},
            "--cluster: cluster must be nats://HOST:PORT addresses separated by commas, got"
            " 'http://a:4222'",
        ),
        ({"node_name": "n1"}, "--node-name: node_name is a cluster setting: it needs cluster"),
        ({"cluster": "nats://a:1", "advertise": "nohost"}, "--advertise: advertise must be"),
        ({"cluster": "nats://a:1", "node_name": "a b"}, "--node-name: node_name must be 1 to 64"),
        ({"cluster_ca": "ca.pem"}, "--cluster-ca: cluster_ca is a cluster setting"),
        (
            {"cluster": "nats://a:1", "cluster_key": "k.pem"},
            "--cluster-key: cluster_key was given without cluster_cert",
        ),
        ({"cluster": "nats://a:1", "cluster_node_timeout": 0}, "--cluster-node-timeout: "),
        ({"cluster": "nats://a:1", "cluster_request_timeout": -1}, "--cluster-request-timeout: "),
    ],
)
def test_cluster_settings_are_checked_in_one_sentence(given: dict[str, Any], message: str) -> None:
    flags = {name: value for name, value in given.items()}
    with pytest.raises(ConfigError) as caught:
        load_config(ServerConfig, env={}, overrides=flags)
    assert str(caught.value).startswith(message)
