"""Unit tests for wsd.core.channels: instance resolution, tenant isolation, publisher permission."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from wsd.core.channels import (
    ChannelError,
    Principal,
    instance_parts,
    may_publish,
    resolve,
    resolve_for_operator,
    valid_segment,
)

GROUPS = {
    "system-status": SimpleNamespace(type="global", publishers=["admin"]),
    "trading-signals": SimpleNamespace(type="company", publishers=["mt5", "api", "admin"]),
    "notifications": SimpleNamespace(type="user", publishers=["api", "admin"]),
    "admin-events": SimpleNamespace(type="admin", publishers=["admin"]),
    "silent": SimpleNamespace(type="global", publishers=[]),
}


def who(user: str = "bob", company: str = "globex", roles: tuple[str, ...] = (), pool: str = "frontend",
        admin: bool = False) -> Principal:
    """A principal as the server builds it from verified claims."""
    return Principal(user, company, frozenset(roles), pool, pool, admin)


ALICE = who("alice", "acme")
BOB_GLOBEX = who("bob", "globex")
ADMIN = who("root", "ops", roles=("admin",), pool="admin", admin=True)


def code_of(name: str, principal: Principal) -> str:
    """The ChannelError code resolve raises for ``name``."""
    with pytest.raises(ChannelError) as info:
        resolve(name, principal, GROUPS)
    return info.value.code


def test_group_name_resolves_to_own_company_instance():
    """A company group named bare resolves to the principal's own company instance."""
    assert resolve("trading-signals", ALICE, GROUPS) == ("trading-signals", "trading-signals/acme")
    assert resolve("trading-signals", BOB_GLOBEX, GROUPS) == ("trading-signals", "trading-signals/globex")


def test_user_group_resolves_to_own_user_instance():
    """A user group named bare resolves to group/company/user from the claims."""
    assert resolve("notifications", ALICE, GROUPS) == ("notifications", "notifications/acme/alice")


def test_global_group_has_one_instance():
    """A global group resolves to itself for everyone."""
    assert resolve("system-status", ALICE, GROUPS) == ("system-status", "system-status")
    assert resolve("system-status", BOB_GLOBEX, GROUPS) == ("system-status", "system-status")


def test_own_instance_named_in_full_is_accepted():
    """Naming one's own instance in full is the same as naming the group."""
    assert resolve("trading-signals/acme", ALICE, GROUPS)[1] == "trading-signals/acme"
    assert resolve("notifications/acme/alice", ALICE, GROUPS)[1] == "notifications/acme/alice"


ATTACKS = [
    "trading-signals/acme", "trading-signals/acme/", "trading-signals//acme", "trading-signals/./acme",
    "trading-signals/../acme", "Trading-Signals/acme", "trading-signals/ACME", " trading-signals/acme",
    "trading-signals/acme ", "trading-signals/acme\u0000", "trading-signals%2Facme", "trading-signals\\acme",
    "trading-signals/acme/alice", "trading-signals/\u0430cme", "trading-signals/\uff41cme",
    "trading-signals/acme\u200b", "trading-signals\u2215acme", "trading-signals/acme/../globex/..",
    "notifications/acme/alice", "notifications/acme", "notifications/globex/alice", "notifications/acme/bob",
    "notifications//alice", "notifications/acme/alice/", "notifications/acme/ALICE", "notifications/*/*",
    "trading-signals/*", "trading-signals/", "/trading-signals/acme", "trading-signals/globex/bob",
]


@pytest.mark.parametrize("name", ATTACKS)
def test_other_tenant_spellings_never_resolve_for_non_admin(name):
    """No spelling of another tenant's instance resolves for a non-admin; each is refused with a code."""
    try:
        _, inst = resolve(name, BOB_GLOBEX, GROUPS)
    except ChannelError as exc:
        assert exc.code in ("forbidden", "bad_request", "unknown_channel")
    else:
        # Anything that resolves at all must be bob's own instance.
        assert inst in ("trading-signals/globex", "notifications/globex/bob"), (name, inst)


def test_other_company_in_full_is_forbidden():
    """Naming another company's instance in full is forbidden, not merely unknown."""
    assert code_of("trading-signals/acme", BOB_GLOBEX) == "forbidden"
    assert code_of("notifications/acme/alice", who("bob", "acme")) == "forbidden"


def test_malformed_names_are_bad_request_or_unknown():
    """Wrong segment counts are bad_request; a group that does not exist is unknown_channel."""
    assert code_of("trading-signals/acme/x", ALICE) == "bad_request"
    assert code_of("notifications/acme", ALICE) == "bad_request"
    assert code_of("system-status/acme", ALICE) == "bad_request"
    assert code_of("Trading-Signals", ALICE) == "unknown_channel"
    assert code_of("", ALICE) == "bad_request"


def test_non_string_name_is_bad_request():
    """A channel that is not a string is refused."""
    with pytest.raises(ChannelError) as info:
        resolve(None, ALICE, GROUPS)  # type: ignore[arg-type]
    assert info.value.code == "bad_request"


def test_admin_group_needs_admin():
    """An admin-only group is forbidden to non-admins and open to admins."""
    assert code_of("admin-events", ALICE) == "forbidden"
    assert resolve("admin-events", ADMIN, GROUPS) == ("admin-events", "admin-events")


def test_admin_may_name_any_instance():
    """An admin may name any tenant's company or user instance in full."""
    assert resolve("trading-signals/acme", ADMIN, GROUPS)[1] == "trading-signals/acme"
    assert resolve("notifications/acme/alice", ADMIN, GROUPS)[1] == "notifications/acme/alice"


def test_admin_named_instances_must_be_valid_segments():
    """Even an admin cannot name an instance with empty or odd segments."""
    for name in ("trading-signals/", "trading-signals/ac me", "trading-signals/acme\u0000",
                 "notifications/acme/", "notifications//alice"):
        assert code_of(name, ADMIN) in ("forbidden", "bad_request"), name


def test_principal_without_company_cannot_use_company_or_user_groups():
    """A token without company_id gets forbidden for company and user groups, not some shared instance."""
    nobody = who("carol", "")
    assert code_of("trading-signals", nobody) == "forbidden"
    assert code_of("notifications", nobody) == "forbidden"
    assert code_of("trading-signals/", nobody) == "forbidden"


def test_operator_names_instances_in_full():
    """The control socket must name instances in full with the right number of valid segments."""
    assert resolve_for_operator("trading-signals/acme", GROUPS) == ("trading-signals", "trading-signals/acme")
    assert resolve_for_operator("notifications/acme/alice", GROUPS)[1] == "notifications/acme/alice"
    assert resolve_for_operator("system-status", GROUPS)[1] == "system-status"
    for bad in ("trading-signals", "notifications/acme", "system-status/x", "trading-signals/a b", ""):
        with pytest.raises(ChannelError) as info:
            resolve_for_operator(bad, GROUPS)
        assert info.value.code == "bad_request", bad
    with pytest.raises(ChannelError) as info:
        resolve_for_operator("nope/acme", GROUPS)
    assert info.value.code == "unknown_channel"


def test_instance_parts():
    """instance_parts splits group, company and user, with '' for missing parts."""
    assert instance_parts("notifications/acme/alice") == ("notifications", "acme", "alice")
    assert instance_parts("trading-signals/acme") == ("trading-signals", "acme", "")
    assert instance_parts("system-status") == ("system-status", "", "")


def test_valid_segment():
    """Segments are short plain ids: no slash, space, NUL or non-ASCII."""
    assert valid_segment("acme") and valid_segment("user.1@x")
    for bad in ("", "a/b", "a b", "a\u0000", "\u0430cme", "x" * 129):
        assert not valid_segment(bad), bad


def test_may_publish_by_pool_or_role():
    """Publishing is allowed when the pool id or one of the roles is in the group's publishers."""
    ts = GROUPS["trading-signals"]
    assert may_publish(ts, who(pool="api"))
    assert may_publish(ts, who(pool="mt5"))
    assert not may_publish(ts, who(pool="frontend"))
    assert may_publish(ts, who(pool="frontend", roles=("admin",)))
    assert not may_publish(GROUPS["silent"], who(pool="admin", roles=("admin",)))
