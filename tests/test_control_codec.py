"""The control protocol's codec alone: bytes in, replies, events and requests out, no socket, no daemon.

``ClientCodec`` is what wsctl's client and the dashboard's source drive; ``ServerCodec`` is what the
daemon's control server drives. These tests feed them bytes as a socket would hand them over.
"""

from __future__ import annotations

import json

import pytest

from wsd.control import protocol as P

HELLO = {"protocol": P.PROTOCOL_VERSION, "version": "0.0.0", "manager_id": "m", "pid": 1}


def line(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def drain(codec: P.ClientCodec | P.ServerCodec) -> list[object]:
    """Everything complete so far, up to NEED_DATA or CLOSED (included)."""
    out: list[object] = []
    while True:
        ev = codec.next_event()
        out.append(ev)
        if ev is P.NEED_DATA or ev is P.CLOSED:
            return out


def greeted() -> tuple[P.ClientCodec, int]:
    """A client codec whose hello was answered, and the id of one request in flight."""
    c = P.ClientCodec(peer="wsd at /s")
    hid, _ = c.hello_request()
    rid, _ = c.request("status")
    c.receive_data(line({"id": hid, "result": HELLO}))
    assert isinstance(c.next_event(), P.Reply) and c.hello == HELLO
    return c, rid


# -- the client side ---------------------------------------------------------------------------------------
def test_request_bytes_are_one_json_line_with_fresh_ids_and_no_null_params():
    c = P.ClientCodec()
    hid, hello = c.hello_request()
    rid, data = c.request("connections.list", {"pool": "mt5", "user": None, "limit": 20})
    assert hello.endswith(b"\n") and hello.count(b"\n") == 1
    assert json.loads(hello) == {"id": hid, "method": "hello", "params": {}}
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert json.loads(data) == {"id": rid, "method": "connections.list", "params": {"pool": "mt5", "limit": 20}}
    assert rid != hid and c.waiting


def test_a_reply_split_across_reads_comes_out_whole_once_its_newline_arrives():
    c, rid = greeted()
    data = line({"id": rid, "result": {"connections": 3, "text": "a\u00e9b"}})
    for i in range(len(data) - 1):  # byte by byte, the last byte (the newline) held back
        c.receive_data(data[i:i + 1])
        assert c.next_event() is P.NEED_DATA
    c.receive_data(data[-1:])
    reply = c.next_event()
    assert isinstance(reply, P.Reply) and reply.id == rid
    assert reply.unwrap() == {"connections": 3, "text": "a\u00e9b"}
    assert c.next_event() is P.NEED_DATA and not c.waiting


def test_several_replies_in_one_read_come_out_in_order():
    c = P.ClientCodec()
    hid, _ = c.hello_request()
    ids = [c.request("status")[0] for _ in range(3)]
    chunk = line({"id": hid, "result": HELLO}) + b"".join(line({"id": i, "result": i * 10}) for i in ids)
    c.receive_data(chunk[:-5])  # the last reply cut short
    got = drain(c)
    assert [r.id for r in got[:-1]] == [hid, *ids[:2]] and got[-1] is P.NEED_DATA  # type: ignore[union-attr]
    c.receive_data(chunk[-5:])
    last = c.next_event()
    assert isinstance(last, P.Reply) and (last.id, last.result) == (ids[2], ids[2] * 10)


def test_an_error_reply_raises_the_daemons_code_with_its_first_line_and_the_rest_as_details():
    c, rid = greeted()
    c.receive_data(line({"id": rid, "error": {"code": "failed", "message": "reload refused:\na: bad\nb: bad"}}))
    reply = c.next_event()
    assert isinstance(reply, P.Reply)
    with pytest.raises(P.RequestFailed) as e:
        reply.unwrap()
    assert (e.value.code, e.value.message, e.value.details) == ("failed", "reload refused:", ["a: bad", "b: bad"])
    assert e.value.as_dict() == {"code": "failed", "message": "reload refused:", "details": ["a: bad", "b: bad"]}


def test_an_error_without_an_id_is_about_the_connection_and_is_handed_out():
    c = P.ClientCodec()
    c.hello_request()
    c.receive_data(line({"id": None, "error": {"code": P.E_FORBIDDEN, "message": "uid 7 may not control this wsd"}}))
    reply = c.next_event()
    assert isinstance(reply, P.Reply) and reply.id is None
    with pytest.raises(P.RequestFailed, match="uid 7") as e:
        reply.unwrap()
    assert e.value.code == P.E_FORBIDDEN


def test_a_reply_to_an_id_never_sent_is_a_protocol_error():
    c, rid = greeted()
    c.receive_data(line({"id": rid + 100, "result": {}}))
    with pytest.raises(P.ProtocolError, match=f"request {rid + 100}, which was never sent") as e:
        c.next_event()
    assert e.value.code == P.E_PROTOCOL and "wsd at /s" in e.value.message


def test_a_second_reply_to_the_same_id_is_a_protocol_error():
    c, rid = greeted()
    c.receive_data(line({"id": rid, "result": 1}) + line({"id": rid, "result": 2}))
    assert isinstance(c.next_event(), P.Reply)
    with pytest.raises(P.ProtocolError, match="answered already"):
        c.next_event()


def test_the_reply_to_a_forgotten_request_is_dropped_and_the_next_reply_still_matches():
    c, first = greeted()
    c.forget(first)  # its caller was cancelled
    second, _ = c.request("pools.list")
    c.receive_data(line({"id": first, "result": "stale"}) + line({"id": second, "result": "fresh"}))
    reply = c.next_event()
    assert isinstance(reply, P.Reply) and (reply.id, reply.result) == (second, "fresh")
    assert c.next_event() is P.NEED_DATA


def test_stream_events_come_out_as_events_after_the_acknowledgement():
    c = P.ClientCodec()
    hid, _ = c.hello_request()
    rid, _ = c.request("events.subscribe", {"backlog": 2})
    evs = [{"seq": 1, "event": "connect"}, {"seq": 2, "event": "disconnect"}]
    c.receive_data(line({"id": hid, "result": HELLO}) + line({"id": rid, "result": {"streaming": True}})
                   + b"".join(line({"event": e}) for e in evs))
    c.receive_data(b"")  # the daemon stopped
    got = drain(c)
    assert [type(x) for x in got[:2]] == [P.Reply, P.Reply]
    assert [x.data for x in got[2:4]] == evs  # type: ignore[union-attr]
    assert got[4] is P.CLOSED


def test_a_daemon_of_another_protocol_version_is_refused_before_any_later_reply():
    c = P.ClientCodec(peer="wsd at /s")
    hid, _ = c.hello_request()
    rid, _ = c.request("status")
    c.receive_data(line({"id": hid, "result": {**HELLO, "protocol": P.PROTOCOL_VERSION + 1}})
                   + line({"id": rid, "result": {}}))
    with pytest.raises(P.ProtocolError) as e:
        c.next_event()
    assert e.value.code == P.E_PROTOCOL_VERSION
    assert e.value.message == (f"wsd at /s speaks control protocol {P.PROTOCOL_VERSION + 1}, this wsctl speaks "
                               f"{P.PROTOCOL_VERSION}: use the wsctl that came with this wsd")
    assert c.hello is None


def test_a_hello_that_is_not_an_object_is_a_protocol_error():
    c = P.ClientCodec()
    hid, _ = c.hello_request()
    c.receive_data(line({"id": hid, "result": "hi"}))
    with pytest.raises(P.ProtocolError, match="did not answer hello"):
        c.next_event()


def test_a_reply_line_over_the_limit_is_refused_before_its_newline_arrives():
    c = P.ClientCodec(max_line_bytes=64)
    c.hello_request()
    c.receive_data(b'{"id": 1, "result": "' + b"x" * 40)
    assert c.next_event() is P.NEED_DATA  # 61 bytes: still under the limit
    c.receive_data(b"x" * 10)
    with pytest.raises(P.ProtocolError, match="longer than 64 bytes"):
        c.next_event()


@pytest.mark.parametrize(("data", "words"), [
    (b"not json\n", "not JSON"),
    (b"[1, 2]\n", "not a JSON object"),
    (b'{"result": 1}\n', "without an id"),
    (b'{"event": 5}\n', "event that is not an object"),
    (b'{"id": "x", "result": 1}\n', "never uses"),
])
def test_lines_that_break_the_protocol_are_named(data, words):
    c = P.ClientCodec()
    c.hello_request()
    c.receive_data(data)
    with pytest.raises(P.ProtocolError, match=words):
        c.next_event()


def test_a_connection_closed_in_the_middle_of_a_line_is_a_protocol_error_not_a_reply():
    c, rid = greeted()
    c.receive_data(b'{"id": %d, "res' % rid)
    c.receive_data(b"")
    with pytest.raises(P.ProtocolError, match="middle of a line"):
        c.next_event()


def test_a_request_over_the_daemons_limit_is_refused_without_bytes():
    c = P.ClientCodec()
    with pytest.raises(P.RequestTooLarge) as e:
        c.request("publish", {"data": "x" * P.MAX_REQUEST_BYTES})
    assert e.value.code == "too_large" and not c.waiting


# -- the daemon's side -------------------------------------------------------------------------------------
def test_server_parses_pipelined_requests_split_anywhere():
    s = P.ServerCodec()
    data = line({"id": 1, "method": "hello"}) + b"\n" + line({"id": 2, "method": "status", "params": {"samples": 3}})
    for i in range(0, len(data), 7):
        s.receive_data(data[i:i + 7])
    got = drain(s)
    assert got == [P.Request(1, "hello", {}), P.Request(2, "status", {"samples": 3}), P.NEED_DATA]
    s.receive_data(b"")
    assert s.next_event() is P.CLOSED


@pytest.mark.parametrize(("data", "rid", "code"), [
    (b"{nope\n", None, P.E_PARSE),
    (b"[]\n", None, P.E_BAD_REQUEST),
    (b'{"id": 4, "method": 5}\n', 4, P.E_BAD_REQUEST),
    (b'{"id": 5, "method": "status", "params": [1]}\n', 5, P.E_BAD_REQUEST),
    (b'{"id": 6, "method": "launch.missiles"}\n', 6, P.E_UNKNOWN_METHOD),
])
def test_server_answers_a_bad_line_and_reads_on(data, rid, code):
    s = P.ServerCodec()
    s.receive_data(data + line({"id": 9, "method": "help"}))
    bad = s.next_event()
    assert isinstance(bad, P.BadRequest) and not bad.fatal
    reply = json.loads(bad.reply)
    assert reply["id"] == rid and reply["error"]["code"] == code and reply["error"]["message"]
    assert s.next_event() == P.Request(9, "help", {})


def test_server_refuses_an_oversize_request_and_says_to_close():
    s = P.ServerCodec(max_line_bytes=100)
    s.receive_data(b'{"id": 1, "method": "publish", "params": {"data": "' + b"x" * 200)
    bad = s.next_event()
    assert isinstance(bad, P.BadRequest) and bad.fatal
    assert json.loads(bad.reply) == {"id": None, "error": {
        "code": P.E_BAD_REQUEST, "message": f"request larger than {P.MAX_REQUEST_BYTES} bytes"}}


def test_what_the_server_encodes_the_client_decodes():
    s, c = P.ServerCodec(), P.ClientCodec()
    hid, hello = c.hello_request()
    rid, req = c.request("events.subscribe", {"kinds": ["kick"]})
    s.receive_data(hello + req)
    r1, r2 = s.next_event(), s.next_event()
    assert isinstance(r1, P.Request) and isinstance(r2, P.Request) and r2.params == {"kinds": ["kick"]}
    c.receive_data(s.result(r1.id, HELLO) + s.result(r2.id, {"streaming": True})
                   + s.event({"seq": 1, "event": "kick"}) + s.error(None, P.E_FAILED, "stopping"))
    got = drain(c)
    assert got[0] == P.Reply(hid, HELLO) and got[1] == P.Reply(rid, {"streaming": True})
    assert got[2] == P.Event({"seq": 1, "event": "kick"})
    assert isinstance(got[3], P.Reply) and got[3].error is not None and got[3].error.code == P.E_FAILED


# -- the contract's tables ---------------------------------------------------------------------------------
def test_the_daemons_tables_agree_with_the_protocol():
    from wsd.core.outbox import PRIORITY_NAMES
    from wsd.runtime import conn
    from wsd.runtime.control import SORTERS

    assert P.PRIORITIES == PRIORITY_NAMES
    assert set(SORTERS) == set(P.SORT_FIELDS) and P.DEFAULT_SORT in P.SORT_FIELDS
    assert P.NUMERIC_SORT_FIELDS <= set(P.SORT_FIELDS)
    assert P.CONNECTION_STATES == (conn.CONNECTING, conn.CONNECTED, conn.DISCONNECTING)
    assert P.STREAM_METHODS <= set(P.METHODS)
    assert len(set(P.EVENT_KINDS)) == len(P.EVENT_KINDS)


def test_wsctls_tables_come_from_the_protocol():
    """wsctl's --sort words, --priority values, dashboard columns and highlighted events are the protocol's."""
    from wsctl import cli
    from wsctl.tui import render as tui_render

    assert [p.value for p in cli.Priority] == list(P.PRIORITIES)
    for col in (*tui_render.WIDE_COLUMNS, *tui_render.NARROW_COLUMNS):
        assert col.key in P.SORT_FIELDS, col
    assert tui_render.WARN_EVENTS <= set(P.EVENT_KINDS)


def test_every_event_kind_is_emitted_somewhere_in_the_daemon():
    """No kind in EVENT_KINDS is dead: each appears as a literal where the runtime emits or records it."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "wsd" / "runtime"
    text = "\n".join(p.read_text() for p in root.rglob("*.py"))
    silent = [k for k in P.EVENT_KINDS if f'"{k}"' not in text]
    assert not silent, f"event kinds nothing emits: {silent}"
