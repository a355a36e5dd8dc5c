"""Unit tests for wsd.core.proxyproto (the PROXY protocol v1/v2 preamble, sans-I/O)."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from wsd.core.proxyproto import V1_MAX, V2_SIGNATURE, Preamble, ProxyHeaderError, parse


def v2(cmd: int = 1, fam: int = 0x11, body: bytes = b"", version: int = 2) -> bytes:
    return V2_SIGNATURE + bytes([(version << 4) | cmd, fam]) + struct.pack("!H", len(body)) + body


def inet(src: str, dst: str, sport: int, dport: int) -> bytes:
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    return a.packed + b.packed + struct.pack("!HH", sport, dport)


def test_v1_tcp4_gives_the_source_and_leaves_the_rest():
    buf = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 8765\r\nGET / HTTP/1.1\r\n"
    pre = parse(buf)
    assert pre == Preamble(1, "PROXY", "203.0.113.7", 51234, buf.index(b"GET"))
    assert buf[pre.length:] == b"GET / HTTP/1.1\r\n"


def test_v1_tcp6_is_normalized():
    pre = parse(b"PROXY TCP6 2001:DB8:0:0::7 2001:db8::1 1 2\r\n")
    assert pre is not None and pre.source == "2001:db8::7"


def test_v1_unknown_means_the_real_peer():
    pre = parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nrest")
    assert pre is not None and pre.command == "LOCAL" and pre.source is None and pre.length == 35


@pytest.mark.parametrize("cut", range(0, 30))
def test_v1_incomplete_asks_for_more(cut):
    assert parse(b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 8765\r\n"[:cut]) is None


@pytest.mark.parametrize("line, words", [
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 51234\r\n", "5 fields"),
    (b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n", "TCP4, TCP6 or UNKNOWN"),
    (b"PROXY TCP4 1.2.3.400 1.2.3.4 1 2\r\n", "source address is not an IP"),
    (b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n", "not IPv4"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "not IPv6"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n", "source port"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 02\r\n", "destination port"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 -1 2\r\n", "source port"),
    (b"PROXY TCP4 1.2.3.4  1.2.3.4 1 2\r\n", "fields"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n", "without CRLF"),
    (b"PROXY TCP4 \xff.2.3.4 1.2.3.4 1 2\r\n", "not ASCII"),
    (b"PROXY " + b"A" * 200, "without CRLF"),
    (b"GET / HTTP/1.1\r\n", "does not start with a PROXY"),
    (b"\r\n\r\nX", "does not start with a PROXY"),
    (b"\x16\x03\x01\x02\x00", "does not start with a PROXY"),  # a TLS ClientHello
])
def test_v1_malformed_is_an_error_with_a_reason(line, words):
    with pytest.raises(ProxyHeaderError, match=words):
        parse(line)


def test_v1_line_of_exactly_the_maximum_is_read():
    pad = "PROXY UNKNOWN " + "x" * (V1_MAX - 16)
    line = pad.encode() + b"\r\n"
    assert len(line) == V1_MAX
    assert parse(line).length == V1_MAX


def test_v2_ipv4_with_tlvs_skipped():
    tlv = b"\x04\x00\x03abc"  # PP2_TYPE_NOOP
    buf = v2(body=inet("198.51.100.9", "10.0.0.1", 40000, 8765) + tlv) + b"GET"
    pre = parse(buf)
    assert pre == Preamble(2, "PROXY", "198.51.100.9", 40000, len(buf) - 3)


def test_v2_ipv6():
    pre = parse(v2(fam=0x21, body=inet("2001:db8::9", "2001:db8::1", 1, 2)))
    assert pre is not None and pre.source == "2001:db8::9" and pre.source_port == 1


def test_v2_local_means_the_real_peer_whatever_the_addresses():
    pre = parse(v2(cmd=0, body=inet("198.51.100.9", "10.0.0.1", 1, 2)))
    assert pre is not None and pre.command == "LOCAL" and pre.source is None


@pytest.mark.parametrize("fam", [0x00, 0x31])
def test_v2_unspec_and_unix_have_no_ip(fam):
    pre = parse(v2(fam=fam, body=b"\x00" * 216))
    assert pre is not None and pre.command == "PROXY" and pre.source is None


def test_v2_incomplete_asks_for_more_at_every_cut():
    buf = v2(body=inet("198.51.100.9", "10.0.0.1", 1, 2))
    for cut in range(len(buf)):
        assert parse(buf[:cut]) is None, cut
    assert parse(buf) is not None


@pytest.mark.parametrize("buf, words", [
    (v2(version=1), "version 1"),
    (v2(cmd=2), "command 2"),
    (v2(fam=0x41), "not defined"),
    (v2(fam=0x13), "not defined"),
    (v2(fam=0x11, body=b"\x01" * 11), "need 12 bytes"),
    (v2(fam=0x21, body=b"\x01" * 35), "need 36 bytes"),
])
def test_v2_malformed_is_an_error_with_a_reason(buf, words):
    with pytest.raises(ProxyHeaderError, match=words):
        parse(buf)


def test_fed_byte_by_byte_gives_the_same_answer():
    """As a receiver feeds it: the buffer grows a byte at a time; the answer comes exactly at the end."""
    for whole in (b"PROXY TCP4 203.0.113.7 10.0.0.1 1 2\r\n", v2(body=inet("203.0.113.7", "10.0.0.1", 1, 2))):
        got = [parse(whole[:i]) for i in range(1, len(whole) + 1)]
        assert all(g is None for g in got[:-1]) and got[-1] is not None and got[-1].source == "203.0.113.7"


def test_v1_zone_index_is_refused_and_ipv4_mapped_is_ipv4():
    """A zone index (``fe80::1%eth0``) is no client's address; an IPv4-mapped source reads as its IPv4
    address."""
    with pytest.raises(ProxyHeaderError, match="source address"):
        parse(b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n")
    assert parse(b"PROXY TCP6 ::ffff:198.51.100.4 ::1 1 2\r\n").source == "198.51.100.4"


def test_v2_ipv4_mapped_source_is_ipv4():
    pre = parse(v2(body=inet("::ffff:198.51.100.4", "::1", 40000, 443), fam=0x21))
    assert pre is not None and pre.source == "198.51.100.4"
