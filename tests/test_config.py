"""Tests for wsd.config (model, loader, env overrides, validation) and the `wsd config` commands."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsd.config import (
    REDACTED,
    AuthConfig,
    Config,
    ConfigError,
    config_to_dict,
    default_config_toml,
    dump_config,
    load,
    load_config,
    resolved_auth,
    resolved_private_key,
    resolved_public_key,
    resolved_secret,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "configs"
SECRET = "s3cr3t-" + "x" * 40  # long enough for HS256, easy to spot in output


def run_wsd(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m wsd config ARGS`, with no WSD_* variables from the caller's environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSD_")}
    return subprocess.run([sys.executable, "-m", "wsd", "config", *args], capture_output=True, text=True,
                          env=env, timeout=30, check=False)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def errors_of(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path / "wsd.toml", text), env=env or {})
    return info.value.errors


def has(errors: list[str], prefix: str, *words: str) -> bool:
    return any(e.startswith(prefix) and all(w in e for w in words) for e in errors)


def ok_toml(extra: str = "") -> str:
    return f'[auth]\nsecret = "{SECRET}"\n{extra}'


def pem_pair() -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return pub, priv


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[tuple[str, str], tuple[str, str]]:
    return pem_pair(), pem_pair()


# --------------------------------------------------------------------------------------- defaults


def test_embedded_defaults_load() -> None:
    """load_config(None) gives the built-in defaults: four pools, four channel groups, no secret yet."""
    cfg = load_config(None, env={})
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 8765
    assert cfg.engine.type == "memory" and cfg.auth.algorithms == ["HS256"]
    assert set(cfg.pools) == {"frontend", "mt5", "admin", "api"}
    assert cfg.pools["frontend"].default_subscriptions == ["system-status"]
    mt5 = cfg.pools["mt5"]
    assert (mt5.type, mt5.path, mt5.allowed_origins, mt5.compression, mt5.batching.enabled) == (
        "mt5_client", "/ws/mt5", [], False, False)
    assert cfg.pools["admin"].roles == ["admin"]
    assert cfg.pools["api"].allowed_origins is None and cfg.pools["api"].compression is None
    assert cfg.channels["system-status"].type == "global"
    assert cfg.channels["trading-signals"].publishers == ["mt5", "api", "admin"]
    assert resolved_secret(cfg) == "" and cfg.source_path == ""


def test_default_toml_is_the_embedded_default(tmp_path: Path) -> None:
    """default_config_toml() loads cleanly and equals the embedded default apart from its secret."""
    text = default_config_toml(SECRET)
    assert "\n# " in text  # commented
    cfg = load_config(write(tmp_path / "d.toml", text), env={})
    assert cfg.auth.secret == SECRET
    cfg.auth.secret, cfg.source_path = "", ""
    assert cfg == load_config(None, env={})


def test_default_toml_has_a_fresh_secret_each_time(tmp_path: Path) -> None:
    """Without an argument default_config_toml() embeds a new random secret long enough for HS512."""
    a, b = (load_config(write(tmp_path / f"{n}.toml", default_config_toml()), env={}) for n in "ab")
    assert a.auth.secret != b.auth.secret and len(a.auth.secret) >= 64


@pytest.mark.parametrize("name", ["minimal.toml", "full.toml"])
def test_example_checks_clean(name: str) -> None:
    """The minimal and full examples load with no error."""
    cfg = load_config(EXAMPLES / name, env={})
    assert cfg.source_path == str(EXAMPLES / name)


def test_full_example_sets_rules() -> None:
    """The full example carries routing rules with targets, transforms and pool transforms."""
    cfg = load_config(EXAMPLES / "full.toml", env={})
    ids = [r.id for r in cfg.routing.rules]
    assert ids == ["critical-alerts", "signals-to-mt5", "margin-calls-to-risk-desk"]
    assert cfg.routing.rules[1].pool_transforms["mt5"].rename == {"price": "px"}


def test_rs256_example_checks_clean_with_its_key(tmp_path: Path, rsa_keys) -> None:
    """The RS256 example checks clean once its public key file exists (path relative to the file)."""
    (pub, _), _ = rsa_keys
    shutil.copy(EXAMPLES / "rs256.toml", tmp_path / "rs256.toml")
    (tmp_path / "keys").mkdir()
    write(tmp_path / "keys" / "jwt-rs256.pub.pem", pub)
    cfg = load_config(tmp_path / "rs256.toml", env={})
    assert cfg.auth.algorithms == ["RS256"]
    assert cfg.auth.public_key_file == str(tmp_path / "keys" / "jwt-rs256.pub.pem")
    assert resolved_public_key(cfg) == pub and resolved_secret(cfg) == ""


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in msgspec.structs.fields(cls):
        if f.name == "source_path":
            continue
        keys.append(f.name)
        inner = [f.type, *typing.get_args(f.type)]
        for tp in inner:
            if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
                keys.extend(_all_keys(tp))
    return keys


def test_every_key_is_documented_and_in_the_full_example() -> None:
    """Every key of the model appears in docs/configuration.md and is set in examples/configs/full.toml."""
    docs = (ROOT / "docs" / "configuration.md").read_text()
    full = (EXAMPLES / "full.toml").read_text()
    for key in set(_all_keys(Config)):
        as_table = rf"[.\[]{key}[.\]]"  # [section], [a.key] or [[key.sub]]
        assert f"`{key}`" in docs or re.search(as_table, docs), key
        assert re.search(rf"(^|[\s{{,]){key} = ", full, re.M) or re.search(as_table, full), key


# ------------------------------------------------------------------------------------------- CLI
# Each `python -m wsd` run costs a fresh interpreter, so the runs are started together, in
# independent chains, by one fixture; the tests then read their chain's results.


def _chain_init(base: Path) -> dict[str, Any]:
    target = base / "new.toml"
    init = run_wsd("init", str(target))
    mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else None
    return {"target": target, "init": init, "mode": mode, "check": run_wsd("check", str(target))}


def _chain_overwrite(base: Path) -> dict[str, Any]:
    target = write(base / "kept.toml", "keep me\n")
    refused = run_wsd("init", str(target))
    kept = target.read_text()
    target.chmod(0o644)
    forced = run_wsd("init", str(target), "--force")
    return {"refused": refused, "kept": kept, "forced": forced, "mode": stat.S_IMODE(target.stat().st_mode),
            "text": target.read_text()}


def _chain_check_bad(base: Path) -> dict[str, Any]:
    bad = write(base / "bad.toml", ok_toml(
        '[pools.mt5]\ntype = "mt5_client"\npath = "/ws/mt5"\nmax_connections = "ten"\n'
        "[pools.mt5.batching]\nfoo = 1\n[bogus]\nx = 1\n"))
    return {"res": run_wsd("check", str(bad))}


def _chain_check_missing(base: Path) -> dict[str, Any]:
    missing = base / "nope.toml"
    return {"missing": missing, "res": run_wsd("check", str(missing))}


def _chain_show(base: Path) -> dict[str, Any]:
    cfg = write(base / "show.toml", ok_toml("[server]\nport = 9100\n"))
    return {"res": run_wsd("show", "-c", str(cfg))}


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    chains = {"init": _chain_init, "overwrite": _chain_overwrite, "check_bad": _chain_check_bad,
              "check_missing": _chain_check_missing, "show": _chain_show}
    with ThreadPoolExecutor(len(chains)) as pool:
        futures = {name: pool.submit(fn, tmp_path_factory.mktemp(name)) for name, fn in chains.items()}
        return {name: fut.result() for name, fut in futures.items()}


def test_init_writes_0600_file_that_checks_clean(cli: dict[str, dict[str, Any]]) -> None:
    """`wsd config init FILE` writes a mode-0600 file and prints its path; `check` accepts it."""
    run = cli["init"]
    assert run["init"].returncode == 0, run["init"].stderr
    assert run["init"].stdout.strip() == str(run["target"])
    assert run["mode"] == 0o600
    assert (run["check"].returncode, run["check"].stdout.strip()) == (0, f"ok: {run['target']}")


def test_init_refuses_to_overwrite_without_force(cli: dict[str, dict[str, Any]]) -> None:
    """`wsd config init` on an existing file exits 1 with one stderr line; --force overwrites."""
    run = cli["overwrite"]
    assert run["refused"].returncode == 1
    assert len(run["refused"].stderr.strip().splitlines()) == 1 and "--force" in run["refused"].stderr
    assert run["kept"] == "keep me\n"
    assert run["forced"].returncode == 0 and run["mode"] == 0o600 and "[manager]" in run["text"]


def test_check_prints_every_error_on_stderr(cli: dict[str, dict[str, Any]]) -> None:
    """`wsd config check` prints each problem as `error: key.path: ...` on stderr and exits 1."""
    res = cli["check_bad"]["res"]
    assert res.returncode == 1 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert 'error: pools.mt5.max_connections: expected int, got "ten"' in lines
    assert any(line.startswith("error: pools.mt5.batching.foo: unknown key") for line in lines)
    assert any(line.startswith("error: bogus: unknown section") for line in lines)


def test_check_missing_file_is_one_error(cli: dict[str, dict[str, Any]]) -> None:
    """`wsd config check` on a missing file prints one error line and exits 1."""
    res, missing = cli["check_missing"]["res"], cli["check_missing"]["missing"]
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [f"error: {missing}: cannot read: No such file or directory"]


def test_show_redacts_the_secret(cli: dict[str, dict[str, Any]]) -> None:
    """`wsd config show -c FILE` prints the effective TOML with the secret replaced by a marker."""
    res = cli["show"]["res"]
    assert res.returncode == 0, res.stderr
    assert SECRET not in res.stdout and REDACTED in res.stdout
    assert "port = 9100" in res.stdout and "[pools.mt5]" in res.stdout


# ------------------------------------------------------------------------------ error collection


def test_all_errors_are_reported_with_dotted_paths(tmp_path: Path) -> None:
    """One load reports wrong types, unknown nested keys and unknown sections together, by TOML path."""
    errs = errors_of(tmp_path, ok_toml(
        '[server]\nprot = 9000\nport = "x"\n'
        '[pools.mt5]\ntype = "mt5_client"\npath = "/ws/mt5"\nmax_connections = "ten"\n'
        "[pools.mt5.batching]\nfoo = 1\n"
        '[pools.web]\ntype = "weird"\npath = "ws"\nallow_cidrs = ["10.0.0.0/33"]\n'
        "[nonsense]\na = 1\n"
        '[[routing.rules]]\nid = "r"\nfilter = { bogus = 1 }\ntarget = { type = "broadcast" }\n'))
    assert 'pools.mt5.max_connections: expected int, got "ten"' in errs
    assert has(errs, "server.prot: unknown key", "port")
    assert has(errs, "server.port: expected int")
    assert has(errs, "pools.mt5.batching.foo: unknown key")
    assert has(errs, "nonsense: unknown section")
    assert has(errs, "pools.web.type: expected one of", "mt5_client")
    assert has(errs, "pools.web.path: must start with")
    assert has(errs, "pools.web.allow_cidrs[0]: not an IP network")
    assert has(errs, "routing.rules[0].filter.bogus: unknown key")
    assert not any(e.startswith("$") for e in errs)


def test_config_error_str_joins_lines(tmp_path: Path) -> None:
    """str(ConfigError) is its error lines joined by newlines."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path / "w.toml", "[server]\nport = true\nhost = 1\n"), env={})
    assert str(info.value) == "\n".join(info.value.errors) and len(info.value.errors) >= 2


def test_missing_required_key_is_named(tmp_path: Path) -> None:
    """A pool without path, or a rule without target, names the missing key."""
    errs = errors_of(tmp_path, ok_toml('[pools.p]\ntype = "api"\n[[routing.rules]]\nid = "r"\n'))
    assert "pools.p.path: required key missing" in errs
    assert "routing.rules[0].target: required key missing" in errs


def test_toml_syntax_error_is_one_line_with_position(tmp_path: Path) -> None:
    """A TOML syntax error is reported once, with its line and column."""
    errs = errors_of(tmp_path, '[server]\nport = 1\nhost = \n')
    assert len(errs) == 1 and "TOML syntax error" in errs[0] and "line 3" in errs[0]


# --------------------------------------------------------------------------------- environment


def test_env_overrides_apply(tmp_path: Path) -> None:
    """WSD_<SECTION>_<KEY> values override file and defaults, parsed as TOML values where they parse."""
    path = write(tmp_path / "w.toml", ok_toml("[server]\nport = 1111\n"))
    cfg = load_config(path, env={
        "WSD_SERVER_PORT": "9000", "WSD_MANAGER_MAX_CONNECTIONS": "5000", "WSD_LOG_LEVEL": "debug",
        "WSD_ENGINE_URL": "redis://h:6379/0", "WSD_ENGINE_TYPE": "redis", "WSD_SERVER_HOST": "0.0.0.0",
        "WSD_HTTP_METRICS_ALLOW": '["10.0.0.0/8"]', "WSD_SERVER_ALLOWED_ORIGINS": "https://a.example,https://b.example",
        "WSD_MANAGER_COMPRESSION_MEMORY_LEVEL": "3", "WSD_MANAGER_ENABLE_COMPRESSION": "true",
        "WSD_SOCKET": "/tmp/x.sock", "WSD_CONFIG": "whatever", "HOME": "/root",
    })
    assert (cfg.server.port, cfg.server.host, cfg.manager.max_connections) == (9000, "0.0.0.0", 5000)
    assert (cfg.log.level, cfg.engine.type, cfg.engine.url) == ("debug", "redis", "redis://h:6379/0")
    assert cfg.http.metrics_allow == ["10.0.0.0/8"]
    assert cfg.server.allowed_origins == ["https://a.example", "https://b.example"]
    assert cfg.manager.compression.memory_level == 3 and cfg.manager.enable_compression is True


def test_env_secret_stays_a_string() -> None:
    """WSD_AUTH_SECRET that looks like a number is still taken as the secret string."""
    digits = "1234567890" * 4
    cfg = load_config(None, env={"WSD_AUTH_SECRET": digits})
    assert cfg.auth.secret == digits and resolved_secret(cfg) == digits


def test_env_secret_replaces_the_files_secret_file(tmp_path: Path) -> None:
    """WSD_AUTH_SECRET wins over a secret_file in the file instead of clashing with it."""
    path = write(tmp_path / "w.toml", '[auth]\nsecret_file = "missing.txt"\n')
    cfg = load_config(path, env={"WSD_AUTH_SECRET": SECRET})
    assert resolved_secret(cfg) == SECRET and cfg.auth.secret_file == ""


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=65535))
def test_env_port_round_trips(port: int) -> None:
    """Any valid port given as WSD_SERVER_PORT becomes server.port."""
    assert load_config(None, env={"WSD_SERVER_PORT": str(port)}).server.port == port


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(codec="ascii", exclude_categories=("Cc",)), min_size=1)
       .filter(lambda t: not t.strip().lstrip("+-").replace("_", "").isdigit()))
def test_env_non_int_port_is_an_error_naming_the_variable(text: str) -> None:
    """A WSD_SERVER_PORT that is not an integer is always refused with the variable named."""
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"WSD_SERVER_PORT": text})
    assert all("WSD_SERVER_PORT" in e for e in info.value.errors if e.startswith("server.port"))
    assert any(e.startswith("server.port") for e in info.value.errors)


def test_env_bad_type_names_the_variable() -> None:
    """A WSD_* value of the wrong type is an error naming both the key and the variable."""
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"WSD_SERVER_PORT": "abc", "WSD_MANAGER_MAX_CONNECTIONS": "[1]"})
    assert has(info.value.errors, "server.port: expected int", "WSD_SERVER_PORT")
    assert has(info.value.errors, "manager.max_connections: expected int", "WSD_MANAGER_MAX_CONNECTIONS")


def test_env_unknown_key_is_an_error() -> None:
    """An unknown WSD_<SECTION>_<KEY> for a known section is an error naming the variable."""
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"WSD_SERVER_PROT": "1", "WSD_POOLS_MT5_PATH": "/x"})
    assert has(info.value.errors, "WSD_SERVER_PROT: unknown setting", "server.prot")
    assert has(info.value.errors, "WSD_POOLS_MT5_PATH:")


# ------------------------------------------------------------------------------------------ auth


def test_short_secret_refused(tmp_path: Path) -> None:
    """An HS256 secret under 32 bytes is refused; HS512 needs 64."""
    assert has(errors_of(tmp_path, '[auth]\nsecret = "short"\n'), "auth.secret: too short", "32")
    errs = errors_of(tmp_path, f'[auth]\nalgorithms = ["HS512"]\nsecret = "{SECRET}"\n')
    assert has(errs, "auth.secret: too short", "64")


def test_file_needs_a_secret_for_hs(tmp_path: Path) -> None:
    """A config file with HS256 but no secret or secret_file is an error (only the built-in default may)."""
    assert has(errors_of(tmp_path, "[server]\nport = 1\n"), "auth.secret: required for HS256")


def test_hs_rs_mix_refused(tmp_path: Path) -> None:
    """Mixing HMAC and public-key algorithms is refused (HS/RS key confusion)."""
    errs = errors_of(tmp_path, ok_toml().replace("[auth]\n", '[auth]\nalgorithms = ["HS256", "RS256"]\n'))
    assert has(errs, "auth.algorithms: mixes HMAC")


def test_none_algorithm_refused(tmp_path: Path) -> None:
    """The "none" algorithm is never accepted, in any case spelling."""
    errs = errors_of(tmp_path, '[auth]\nalgorithms = ["None"]\n')
    assert has(errs, "auth.algorithms[0]:", "never allowed")
    assert has(errors_of(tmp_path, "[auth]\nalgorithms = []\n"), "auth.algorithms: must name")


def test_secret_file_is_read_relative_to_the_config(tmp_path: Path) -> None:
    """auth.secret_file is read at load (relative to the config file), stripped, and not shown by dump."""
    write(tmp_path / "secret.txt", SECRET + "\n")
    cfg = load_config(write(tmp_path / "w.toml", '[auth]\nsecret_file = "secret.txt"\n'), env={})
    assert resolved_secret(cfg) == SECRET and cfg.auth.secret == ""
    assert cfg.auth.secret_file == str(tmp_path / "secret.txt")
    assert SECRET not in dump_config(cfg, redact=True)


def test_missing_secret_file_names_the_key(tmp_path: Path) -> None:
    """An unreadable secret_file is an error naming auth.secret_file; secret and secret_file together too."""
    assert has(errors_of(tmp_path, '[auth]\nsecret_file = "nope.txt"\n'), "auth.secret_file: cannot read")
    write(tmp_path / "s.txt", SECRET)
    errs = errors_of(tmp_path, f'[auth]\nsecret = "{SECRET}"\nsecret_file = "s.txt"\n')
    assert has(errs, "auth.secret_file:", "not both")


def test_rs_needs_public_key_and_matching_private_key(tmp_path: Path, rsa_keys) -> None:
    """RS256 requires public_key_file; a private key that does not match it is refused; a match loads."""
    (pub, priv), (_, other_priv) = rsa_keys
    assert has(errors_of(tmp_path, '[auth]\nalgorithms = ["RS256"]\n'), "auth.public_key_file: required")
    write(tmp_path / "pub.pem", pub)
    write(tmp_path / "priv.pem", priv)
    write(tmp_path / "other.pem", other_priv)
    base = '[auth]\nalgorithms = ["RS256"]\npublic_key_file = "pub.pem"\n'
    errs = errors_of(tmp_path, base + 'private_key_file = "other.pem"\n')
    assert has(errs, "auth.private_key_file: does not match")
    assert has(errors_of(tmp_path, '[auth]\nalgorithms = ["RS256"]\npublic_key_file = "priv.pem"\n'),
               "auth.public_key_file: holds a private key")
    assert has(errors_of(tmp_path, base + f'secret = "{SECRET}"\n'), "auth.secret: not used")
    cfg = load_config(write(tmp_path / "ok.toml", base + 'private_key_file = "priv.pem"\n'), env={})
    assert resolved_private_key(cfg) == priv


def test_load_returns_the_key_material_it_read(tmp_path: Path, rsa_keys) -> None:
    """load() returns the RS256 key pair read from the files with the config; the config keeps them, so
    a key file changed after the load is not seen until the next load; the keys never show in repr."""
    (pub, priv), (pub2, priv2) = rsa_keys
    write(tmp_path / "pub.pem", pub)
    write(tmp_path / "priv.pem", priv)
    path = write(tmp_path / "w.toml",
                 '[auth]\nalgorithms = ["RS256"]\npublic_key_file = "pub.pem"\nprivate_key_file = "priv.pem"\n')
    loaded = load(path, env={})
    assert loaded.auth.algorithms == ("RS256",) and not loaded.auth.hmac
    assert loaded.auth.verify_key == pub and loaded.auth.sign_key == priv
    assert resolved_auth(loaded.config) is loaded.auth
    assert "BEGIN" not in repr(loaded.auth) and "BEGIN" not in repr(loaded)
    write(tmp_path / "pub.pem", pub2)
    write(tmp_path / "priv.pem", priv2)
    assert resolved_auth(loaded.config).verify_key == pub  # what was checked at load, not the file now
    again = load(path, env={})
    assert again.auth.verify_key == pub2 and again.auth.sign_key == priv2


def test_hmac_key_material_follows_the_auth_section(tmp_path: Path) -> None:
    """HS256: verify and sign with the same secret; a config whose [auth] is replaced in code resolves
    the new secret, and a bad key file in a hand-built config raises ConfigError naming its key."""
    write(tmp_path / "secret.txt", SECRET + "\n")
    loaded = load(write(tmp_path / "w.toml", '[auth]\nsecret_file = "secret.txt"\n'), env={})
    assert loaded.auth.hmac and loaded.auth.verify_key == loaded.auth.sign_key == SECRET
    assert SECRET not in repr(loaded.auth)
    other = "o" * 40
    cfg = msgspec.structs.replace(loaded.config,
                                  auth=msgspec.structs.replace(loaded.config.auth, secret=other, secret_file=""))
    assert resolved_auth(cfg).verify_key == other and resolved_secret(cfg) == other
    assert resolved_auth(Config()).verify_key == ""  # built-in defaults: no secret (the daemon makes one)
    bad = Config(auth=AuthConfig(algorithms=["RS256"], public_key_file=str(tmp_path / "missing.pem")))
    with pytest.raises(ConfigError) as info:
        resolved_auth(bad)
    assert has(info.value.errors, "auth.public_key_file: cannot read")


def test_es_algorithm_with_rsa_key_refused(tmp_path: Path, rsa_keys) -> None:
    """A public key of the wrong type for the algorithm (RSA key for ES256) is refused."""
    write(tmp_path / "pub.pem", rsa_keys[0][0])
    errs = errors_of(tmp_path, '[auth]\nalgorithms = ["ES256"]\npublic_key_file = "pub.pem"\n')
    assert has(errs, "auth.public_key_file: not a usable ES256 public key")


# ----------------------------------------------------------------------------------- server, net


def test_tls_cert_without_key_refused(tmp_path: Path) -> None:
    """tls_cert without tls_key is an error; named TLS files must exist."""
    write(tmp_path / "cert.pem", "x")
    errs = errors_of(tmp_path, ok_toml('[server]\ntls_cert = "cert.pem"\n'))
    assert has(errs, "server.tls_key: required when server.tls_cert is set")
    errs = errors_of(tmp_path, ok_toml('[server]\ntls_cert = "no.pem"\ntls_key = "no.key"\n'))
    assert has(errs, "server.tls_cert: cannot read") and has(errs, "server.tls_key: cannot read")


def test_tls_pair_loads(tmp_path: Path) -> None:
    """A real certificate and key load; a garbage pair is refused."""
    trustme = pytest.importorskip("trustme")
    cert = trustme.CA().issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    toml = ok_toml('[server]\ntls_cert = "c.pem"\ntls_key = "k.pem"\n')
    cfg = load_config(write(tmp_path / "w.toml", toml), env={})
    assert cfg.server.tls_key == str(tmp_path / "k.pem")
    write(tmp_path / "junk.pem", "junk")
    errs = errors_of(tmp_path, ok_toml('[server]\ntls_cert = "junk.pem"\ntls_key = "k.pem"\n'))
    assert has(errs, "server.tls_cert: certificate and key do not load")


def test_bad_cidr_refused(tmp_path: Path) -> None:
    """CIDRs in pools.<id>.allow_cidrs and http.metrics_allow must parse."""
    errs = errors_of(tmp_path, ok_toml('[http]\nmetrics_allow = ["10.0.0.1/8", "nope"]\n'
                                       '[pools.p]\ntype = "api"\npath = "/p"\nallow_cidrs = ["300.1.1.1"]\n'))
    assert has(errs, "http.metrics_allow[1]: not an IP network")
    assert not has(errs, "http.metrics_allow[0]")  # host bits set is fine (strict=False)
    assert has(errs, "pools.p.allow_cidrs[0]: not an IP network")


def test_numbers_out_of_range_refused(tmp_path: Path) -> None:
    """Port outside 0..65535, a too-short heartbeat and non-positive sizes are refused."""
    errs = errors_of(tmp_path, ok_toml("[server]\nport = 70000\n[manager]\nheartbeat_interval_ms = 50\n"
                                       "max_connections = 0\nmessage_buffer_size = 0\n"))
    for key in ("server.port", "manager.heartbeat_interval_ms", "manager.max_connections",
                "manager.message_buffer_size"):
        assert has(errs, key + ": must be"), key


# ---------------------------------------------------------------------------- pools and channels


def test_file_pools_replace_defaults_wholesale(tmp_path: Path) -> None:
    """A file's [pools] replaces the built-in pools; channels stay built-in when the file has none."""
    toml = ok_toml('[pools.only]\ntype = "api"\npath = "/only"\n')
    cfg = load_config(write(tmp_path / "w.toml", toml), env={})
    assert list(cfg.pools) == ["only"] and "system-status" in cfg.channels
    assert cfg.pools["only"].batching.enabled is True and cfg.pools["only"].allowed_origins is None


def test_default_subscription_must_name_a_channel(tmp_path: Path) -> None:
    """default_subscriptions naming a missing channel group is an error."""
    errs = errors_of(tmp_path, ok_toml(
        '[pools.p]\ntype = "api"\npath = "/p"\ndefault_subscriptions = ["nope"]\n'))
    assert has(errs, "pools.p.default_subscriptions[0]: no channel group", "nope")


def test_pool_paths_unique_and_rooted(tmp_path: Path) -> None:
    """Pool paths must start with "/" and be unique."""
    errs = errors_of(tmp_path, ok_toml(
        '[pools.a]\ntype = "api"\npath = "/x"\n[pools.b]\ntype = "api"\npath = "/x"\n'
        '[pools.c]\ntype = "api"\npath = "x"\n'))
    assert has(errs, "pools.b.path:", "already") and has(errs, "pools.c.path: must start with")


# ----------------------------------------------------------------------------------------- routing


def test_rule_group_target_needs_a_known_group(tmp_path: Path) -> None:
    """A group target naming an unknown channel group is an error."""
    errs = errors_of(tmp_path, ok_toml(
        '[[routing.rules]]\nid = "r"\ntarget = { type = "group", group_id = "zz" }\n'))
    assert has(errs, "routing.rules[0].target.group_id: no channel group", "zz")


def test_rule_targets_need_their_fields(tmp_path: Path) -> None:
    """individual needs connection_ids, filtered an expression; target pools must exist; ids are unique."""
    errs = errors_of(tmp_path, ok_toml(
        '[[routing.rules]]\nid = "a"\ntarget = { type = "individual" }\n'
        '[[routing.rules]]\nid = "a"\ntarget = { type = "filtered" }\n'
        '[[routing.rules]]\nid = "c"\ntarget = { type = "broadcast", pools = ["ghost"] }\n'))
    assert has(errs, "routing.rules[0].target.connection_ids: required")
    assert has(errs, "routing.rules[1].filter.expression: required")
    assert has(errs, "routing.rules[1].id:", "already")
    assert has(errs, "routing.rules[2].target.pools[0]: no pool", "ghost")


def test_invalid_expression_reported_with_its_path(tmp_path: Path) -> None:
    """A rule expression that does not compile is reported under routing.rules[N].filter.expression."""
    pytest.importorskip("wsd.core.expr")
    errs = errors_of(tmp_path, ok_toml(
        '[[routing.rules]]\nid = "r"\nfilter = { expression = "(((" }\ntarget = { type = "filtered" }\n'))
    assert has(errs, "routing.rules[0].filter.expression:")


def test_engine_redis_needs_url(tmp_path: Path) -> None:
    """engine.type redis without url is an error; a url with the memory engine is too."""
    assert has(errors_of(tmp_path, ok_toml('[engine]\ntype = "redis"\n')), "engine.url: required")
    assert has(errors_of(tmp_path, ok_toml('[engine]\nurl = "redis://h"\n')), "engine.url: set, but")


# ------------------------------------------------------------------------------------------- output


def test_dump_round_trips_and_redacts(tmp_path: Path) -> None:
    """dump_config(redact=False) loads back to the same config; redacted output hides the secret."""
    cfg = load_config(EXAMPLES / "full.toml", env={})
    again = load_config(write(tmp_path / "d.toml", dump_config(cfg, redact=False)), env={})
    again.source_path = cfg.source_path
    assert again == cfg
    assert cfg.auth.secret not in dump_config(cfg) and REDACTED in dump_config(cfg)


def test_config_to_dict_is_json_and_redacts_urls() -> None:
    """config_to_dict is JSON-able and hides the secret and a password in engine.url."""
    cfg = load_config(None, env={"WSD_AUTH_SECRET": SECRET, "WSD_ENGINE_TYPE": "redis",
                                 "WSD_ENGINE_URL": "redis://u:pw123@h:6379/0"})
    text = json.dumps(config_to_dict(cfg))
    assert SECRET not in text and "pw123" not in text and REDACTED in text
    assert config_to_dict(cfg, redact=False)["auth"]["secret"] == SECRET
    assert isinstance(cfg, Config)
