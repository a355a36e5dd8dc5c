"""Unit tests for wsd.core.forwarded: the client's address behind trusted proxies."""

from __future__ import annotations

import ipaddress

import pytest

from wsd.core.forwarded import MAX_CHARS, TrustedProxies, forwarded_for, parse_node


def tp(*cidrs: str, header: str = "x-forwarded-for") -> TrustedProxies:
    return TrustedProxies([ipaddress.ip_network(c) for c in cidrs], header)


@pytest.mark.parametrize("text, ip", [
    ("192.0.2.1", "192.0.2.1"), (" 192.0.2.1:4711 ", "192.0.2.1"), ("2001:DB8::1", "2001:db8::1"),
    ("[2001:db8::1]", "2001:db8::1"), ("[2001:db8::1]:4711", "2001:db8::1"), ("unknown", None),
    ("_hidden", None),
])
def test_parse_node(text, ip):
    assert parse_node(text, "X") == ip


@pytest.mark.parametrize("text", ["", "1.2.3", "1.2.3.4:", "1.2.3.4:x", "[::1", "[::1]x", "[::1]:99999",
                                  "example.com", "1.2.3.4:80:80x"])
def test_parse_node_refuses(text):
    with pytest.raises(ValueError, match="X-Forwarded-For: not an address"):
        parse_node(text, "X-Forwarded-For")


def test_nobody_trusted_means_the_peer_whatever_it_sends():
    assert tp().client("203.0.113.5", None, ["10.9.9.9"]) == "203.0.113.5"
    assert tp("10.0.0.0/8").client("203.0.113.5", None, ["10.9.9.9", "garbage"]) == "203.0.113.5"


def test_walk_from_the_right_stops_at_the_first_untrusted():
    t = tp("10.0.0.0/8", "2001:db8:ffff::/48")
    # the client wrote 6.6.6.6 itself; the edge proxy appended the client's real address, then an inner proxy
    assert t.client("10.0.0.2", None, ["6.6.6.6, 198.51.100.4, 10.0.0.1"]) == "198.51.100.4"
    # several header lines are one list, in order
    assert t.client("10.0.0.2", None, ["6.6.6.6", "198.51.100.4", "10.0.0.1"]) == "198.51.100.4"
    assert t.client("2001:db8:ffff::1", None, ["2001:db8::77"]) == "2001:db8::77"


def test_garbage_left_of_the_client_is_never_read():
    assert tp("10.0.0.0/8").client("10.0.0.2", None, ["not an address, 198.51.100.4"]) == "198.51.100.4"


def test_malformed_entry_the_walk_reaches_is_an_error():
    with pytest.raises(ValueError, match="X-Forwarded-For: not an address: 'bogus'"):
        tp("10.0.0.0/8").client("10.0.0.2", None, ["198.51.100.4, bogus"])


def test_all_trusted_gives_the_leftmost():
    assert tp("10.0.0.0/8").client("10.0.0.2", None, ["10.1.1.1, 10.0.0.1"]) == "10.1.1.1"


def test_unknown_ends_at_the_proxy_that_wrote_it():
    assert tp("10.0.0.0/8").client("10.0.0.2", None, ["6.6.6.6, unknown"]) == "10.0.0.2"


def test_empty_elements_are_skipped_and_no_header_means_the_peer():
    t = tp("10.0.0.0/8")
    assert t.client("10.0.0.2", None, ["198.51.100.4,, "]) == "198.51.100.4"
    assert t.client("10.0.0.2", None, []) == "10.0.0.2"


def test_ipv4_mapped_peer_counts_as_its_ipv4():
    assert tp("127.0.0.0/8").client("::ffff:127.0.0.1", None, ["198.51.100.4"]) == "198.51.100.4"


def test_proxy_protocol_source_comes_before_the_header():
    t = tp("10.0.0.0/8")
    # the PROXY preamble's source is an ordinary client: a header it sent is not read
    assert t.client("10.0.0.2", "198.51.100.4", ["6.6.6.6"]) == "198.51.100.4"
    # the preamble came from another trusted proxy (an inner hop): the header is read
    assert t.client("10.0.0.2", "10.0.0.9", ["198.51.100.4"]) == "198.51.100.4"


def test_header_none_reads_no_header():
    assert tp("10.0.0.0/8", header="none").client("10.0.0.2", None, ["198.51.100.4"]) == "10.0.0.2"


def test_forwarded_rfc7239():
    t = tp("10.0.0.0/8", header="forwarded")
    v = ['for=6.6.6.6;proto=http, for="[2001:db8:cafe::17]:4711";by=10.0.0.1', "for=10.0.0.1;proto=https"]
    assert t.client("10.0.0.2", None, v) == "2001:db8:cafe::17"
    assert t.client("10.0.0.2", None, ['For="198.51.100.4:80"']) == "198.51.100.4"
    assert t.client("10.0.0.2", None, ["for=_secret"]) == "10.0.0.2"
    assert t.client("10.0.0.2", None, ["proto=https"]) == "10.0.0.2"  # no for=: unknown
    # a comma inside a quoted string does not split elements
    assert t.client("10.0.0.2", None, ['for=198.51.100.4;x="a,b"']) == "198.51.100.4"


@pytest.mark.parametrize("value, words", [
    ("for", "name=value"), ("for=1.2.3.4;for=1.2.3.5", "more than one for"), ('for="1.2.3.4', "unterminated"),
    ("for=[::1]", "token or a quoted"), ("for=nope", "Forwarded: not an address"),
])
def test_forwarded_malformed(value, words):
    with pytest.raises(ValueError, match=words):
        tp("10.0.0.0/8", header="forwarded").client("10.0.0.2", None, [value])


def test_forwarded_for_unquotes():
    assert forwarded_for('for="\\[::1\\]"') == "::1"  # a quoted-pair is the character
    assert forwarded_for('for="198.51.100.4"') == "198.51.100.4"


@pytest.mark.parametrize("text", ["fe80::1%eth0", "[fe80::1%25x]:80", "fe80::1%a\x9b31m",
                                  "fe80::1%" + "x" * 500])
def test_parse_node_refuses_a_zone_index(text):
    """``ipaddress`` takes ``fe80::1%<anything but / and %>`` (a zone index): a client's address never has
    one, and each spelling would be another per-address limiter key and arbitrary text in the records."""
    with pytest.raises(ValueError, match="X-Forwarded-For: not an address"):
        parse_node(text, "X-Forwarded-For")


def test_an_ipv4_mapped_hop_is_its_ipv4_address():
    """A proxy on a dual-stack socket writes ``::ffff:198.51.100.4``: the same client as ``198.51.100.4`` (one
    limiter key, one address in ``wsctl connections``), not ``::ffff:c633:6404``."""
    assert parse_node("::ffff:198.51.100.4", "X") == "198.51.100.4"
    assert parse_node("[::ffff:198.51.100.4]:80", "X") == "198.51.100.4"
    chain = ["::ffff:198.51.100.4, ::ffff:10.0.0.1"]
    assert tp("10.0.0.0/8").client("10.0.0.2", None, chain) == "198.51.100.4"


@pytest.mark.parametrize("header", ["x-forwarded-for", "forwarded"])
def test_an_overlong_forwarded_header_is_refused_before_it_is_parsed(header):
    """128 header lines of 8 KiB each (what websockets lets through) took the Forwarded parser ~0.4 s of the
    event loop per handshake; a chain longer than MAX_CHARS is no proxy's: a one-line error naming the header.
    From an untrusted peer nothing is read, whatever its length."""
    name = "X-Forwarded-For" if header == "x-forwarded-for" else "Forwarded"
    entry = "192.0.2.1" if header == "x-forwarded-for" else "for=192.0.2.1"
    t = tp("10.0.0.0/8", header=header)
    fits = ",".join([entry] * (MAX_CHARS // (len(entry) + 1)))
    assert t.client("10.0.0.2", None, [fits]) == "192.0.2.1"
    with pytest.raises(ValueError, match=rf"^{name}: longer than {MAX_CHARS} characters"):
        t.client("10.0.0.2", None, [fits, fits])
    assert t.client("203.0.113.5", None, [fits] * 128) == "203.0.113.5"


def test_a_preamble_without_an_address_ends_the_walk_at_the_proxy():
    """relayed "": a PROXY header that named no client (LOCAL, v1 UNKNOWN, v2 AF_UNSPEC / AF_UNIX). In TCP
    mode the bytes after it are the client's own: its X-Forwarded-For must not be read, or it chooses its
    address."""
    t = tp("10.0.0.0/8")
    assert t.client("10.0.0.2", "", ["6.6.6.6"]) == "10.0.0.2"
    assert tp("10.0.0.0/8", header="forwarded").client("10.0.0.2", "", ["for=6.6.6.6"]) == "10.0.0.2"
    assert t.client("10.0.0.2", None, ["6.6.6.6"]) == "6.6.6.6"  # no PROXY header at all: the header is read
