// WsdClient against a real wsd (memory engine), started by tests/test_js_client.py with the CONFIG there:
// WSD_PORT, WSD_SOCKET (its control socket, used to publish, kick, send, read connections and mint tokens).

import assert from "node:assert/strict";
import net from "node:net";
import { test } from "node:test";

import {
  ClientClosed, ClientError, Gap, Kicked, Message, NotAdmitted, TakenOver, WsdClient,
} from "../wsd-client.js";
import { ctl, env, Proxy, take, token, waitFor } from "./helpers.js";

const PORT = env("WSD_PORT");
const SOCKET = env("WSD_SOCKET");
const url = (pool, port = PORT) => `ws://127.0.0.1:${port}/ws/${pool}`;
const FAST = { backoffBase: 0.05, backoffCap: 0.2, connectTimeout: 10, requestTimeout: 5 };
const CH = "trading-signals/acme";

async function publish(n, start = 1, extra = {}) {
  const out = [];
  for (let i = start; i < start + n; i++) out.push(await ctl(SOCKET, "publish", { channel: CH, data: { n: i }, ...extra }));
  return out;
}

/** A port nothing listens on (it was free a moment ago). */
async function closedPort() {
  const probe = new Proxy(1);
  const port = await probe.listen();
  await probe.close();
  return port;
}

async function client(user, urls = url("api"), options = {}) {
  const c = new WsdClient(urls, { token: await token(SOCKET, user), ...FAST, ...options });
  await c.start();
  return c;
}

test("connect, subscribe, publish and receive in order; history; states", async () => {
  const states = [];
  const c = await client("pub", url("api"), { onState: (s) => states.push(s) });
  assert.equal(c.state, "open");
  assert.ok(c.sessionId);
  assert.equal(c.url, url("api"));
  const sub = await c.subscribe("trading-signals");
  assert.equal(sub.channel, CH);
  const sent = [];
  for (let i = 0; i < 3; i++) {
    sent.push(await c.publish("trading-signals", { x: i }, { type: "trading_signal", priority: "high" }));
  }
  const got = [];
  for (let i = 0; i < 3; i++) got.push(await take(sub));
  assert.ok(got.every((m) => m instanceof Message && m.kind === "message"));
  assert.deepEqual(got.map((m) => [m.channel, m.offset, m.epoch, m.type, m.data, m.seq, m.priority, m.keyId,
    m.decryptError]), sent.map((s, i) => [CH, s.offset, s.epoch, "trading_signal", { x: i }, null, "high", null,
    null]));
  assert.deepEqual(sub.processed, { offset: sent[2].offset, epoch: sent[2].epoch });
  assert.deepEqual(c.positions, { [CH]: sub.processed });
  const page = await c.history("trading-signals", { limit: 2 });
  assert.ok(page.recovered);
  assert.deepEqual([...page].map((m) => m.data), [{ x: 1 }, { x: 2 }]);
  assert.ok(page.messages.every((m) => m.history));
  assert.equal(typeof (await c.ping()), "number");
  await c.close();
  assert.deepEqual(states.slice(0, 2), ["connecting", "open"]);
  assert.equal(states.at(-1), "closed");
  assert.deepEqual(await take(sub), { done: true }); // the iterator ends once the client is closed
});

test("an error reply is a RequestError with the server's code", async () => {
  const c = await client("err");
  await assert.rejects(c.subscribe("no-such-group"), (e) => e.code === "unknown_channel");
  await assert.rejects(c.publish("trading-signals/globex", {}), (e) => e.code === "forbidden");
  await assert.rejects(c.subscribe("trading-signals", { mode: "on_demand" }), RangeError);
  await c.close();
});

test("batch frames are unpacked in order; for await and sub.on both work", async () => {
  const c = await client("b", url("frontend"));
  const sub = await c.subscribe("trading-signals", { mode: "batch" });
  const sent = await publish(3);
  const got = [];
  for await (const m of sub) {
    got.push(m);
    if (got.length === 3) break;
  }
  assert.deepEqual(got.map((m) => [m.offset, m.data]), sent.map((s, i) => [s.offset, { n: i + 1 }]));
  const info = await ctl(SOCKET, "connections.get", { id: c.welcome.connection_id });
  assert.equal(info.subscriptions.find((s) => s.channel === CH).mode, "batch");
  const pushed = [];
  sub.on("message", (m) => pushed.push(m.data.n));
  await publish(2, 4);
  await waitFor(() => pushed.length === 2, 5, "pushed messages");
  assert.deepEqual(pushed, [4, 5]);
  assert.equal(sub.pending(), 0);
  await c.close();
});

test("a reliable message is acked only once the application takes it", async () => {
  const c = await client("rel");
  const sub = await c.subscribe("trading-signals");
  const cid = c.welcome.connection_id;
  await ctl(SOCKET, "publish", { channel: CH, type: "order", data: { qty: 1 } });
  await waitFor(() => sub.pending() === 1, 5, "received");
  await c.ping(); // frames are handled in order: an ack sent on receipt would be counted by now
  assert.equal((await ctl(SOCKET, "connections.get", { id: cid })).reliable.unacked, 1);
  const m = await take(sub);
  assert.equal(m.seq, 1);
  assert.equal(m.type, "order");
  await waitFor(async () => (await ctl(SOCKET, "connections.get", { id: cid })).reliable.unacked === 0, 5, "acked");
  await c.close();
});

test("duplicates are dropped by epoch and offset", async () => {
  const c = await client("d");
  const sub = await c.subscribe("trading-signals");
  const sent = await publish(3);
  const first = [];
  for (let i = 0; i < 3; i++) first.push((await take(sub)).offset);
  assert.deepEqual(first, sent.map((s) => s.offset));
  // The server sends the last 3 again (a subscribe with history on the client's own socket).
  c._conn.ws.send(JSON.stringify({ op: "subscribe", id: "again", channel: "trading-signals", history: { limit: 3 } }));
  await waitFor(() => c.duplicatesDropped === 3, 5, "duplicates dropped");
  const [next] = await publish(1, 4);
  const m = await take(sub);
  assert.deepEqual([m.offset, m.data], [next.offset, { n: 4 }]);
  assert.equal(sub.pending(), 0);
  await c.close();
});

test("offsets skipped by a types filter are looked up and are not a gap", async () => {
  const c = await client("f2");
  const sub = await c.subscribe("trading-signals", { types: ["a"] });
  const a1 = await ctl(SOCKET, "publish", { channel: CH, type: "a", data: { n: 1 } });
  await ctl(SOCKET, "publish", { channel: CH, type: "b", data: { n: 2 } });
  const a3 = await ctl(SOCKET, "publish", { channel: CH, type: "a", data: { n: 3 } });
  const got = [await take(sub), await take(sub)];
  assert.deepEqual(got.map((m) => [m.kind, m.offset]), [["message", a1.offset], ["message", a3.offset]]);
  assert.equal(c.gaps, 0);
  assert.ok(c.historyFills >= 1);
  await c.close();
});

test("an offset jump that history cannot fill is a Gap between the two positions", async () => {
  const c = await client("g");
  const sub = await c.subscribe("trading-signals", { types: ["a"] });
  await ctl(SOCKET, "publish", { channel: CH, type: "a", data: { n: 1 } });
  const first = await take(sub);
  for (let i = 2; i < 6; i++) await ctl(SOCKET, "publish", { channel: CH, type: "b", data: { n: i } });
  const last = await ctl(SOCKET, "publish", { channel: CH, type: "a", data: { n: 6 } }); // history_size = 3
  const gap = await take(sub);
  assert.ok(gap instanceof Gap, JSON.stringify(gap));
  assert.equal(gap.kind, "gap");
  assert.deepEqual(gap.last, first.position);
  assert.deepEqual(gap.resumed, { offset: last.offset, epoch: last.epoch });
  assert.match(gap.reason, /recovered:false/);
  const m = await take(sub);
  assert.deepEqual([m.offset, m.data], [last.offset, { n: 6 }]);
  await c.close();
});

test("fillGaps: false yields every jump as a Gap at once", async () => {
  const c = await client("nf", url("api"), { fillGaps: false });
  const sub = await c.subscribe("trading-signals", { types: ["a"] });
  for (const t of ["a", "b", "a"]) await ctl(SOCKET, "publish", { channel: CH, type: t, data: {} });
  const got = [await take(sub), await take(sub), await take(sub)];
  assert.deepEqual(got.map((i) => i.kind), ["message", "gap", "message"]);
  assert.deepEqual([got[1].last, got[1].resumed], [got[0].position, got[2].position]);
  await c.close();
});

test("subscribe since a position the server no longer holds is a Gap before what is held", async () => {
  const c = await client("s");
  const sub = await c.subscribe("trading-signals", { since: { offset: 7, epoch: "gone" } });
  const gap = await take(sub);
  assert.ok(gap instanceof Gap);
  assert.deepEqual(gap.last, { offset: 7, epoch: "gone" });
  assert.match(gap.reason, /recovered:false/);
  const held = (await c.history("trading-signals")).messages;
  const got = [];
  for (let i = 0; i < held.length; i++) got.push((await take(sub)).offset);
  assert.deepEqual(got, held.map((m) => m.offset));
  await c.close();
});

test("a dropped network resumes the session without loss, duplicate or gap", async () => {
  const proxy = new Proxy(PORT);
  const pport = await proxy.listen();
  let open;
  const gate = new Promise((r) => { open = r; });
  const c = await client("net", url("api", pport), { sleep: () => gate });
  const sub = await c.subscribe("trading-signals");
  const [p1] = await publish(1);
  assert.equal((await take(sub)).offset, p1.offset);
  const first = c.sessionId;
  proxy.cut(); // no close frame: the client sees 1006
  await waitFor(async () => c.state === "connecting"
    && (await ctl(SOCKET, "connections.list", { user: "net" })).total === 0, 5, "the drop noticed on both sides");
  const sent = await publish(2, 2); // published while the client is away
  open();
  const got = [await take(sub), await take(sub)];
  assert.deepEqual(got.map((m) => [m.offset, m.data]), sent.map((s, i) => [s.offset, { n: i + 2 }]));
  assert.equal(c.sessionId, first);
  assert.equal(c.welcome.resumed, true);
  assert.equal(c.connections, 2);
  const [p4] = await publish(1, 4);
  assert.equal((await take(sub)).offset, p4.offset);
  assert.equal(sub.pending(), 0);
  assert.equal(c.gaps, 0);
  await c.close();
  await proxy.close();
});

test("a stalled network is noticed by the ping timeout; the client reconnects and resumes", async () => {
  const proxy = new Proxy(PORT);
  const pport = await proxy.listen();
  const c = await client("stall", url("api", pport), { pingInterval: 0.3, pingTimeout: 0.5 });
  const sub = await c.subscribe("trading-signals");
  proxy.stall(); // forwards nothing more, closes nothing
  const sent = await publish(2);
  await waitFor(() => c.connections === 2 && c.state === "open", 10, "reconnected");
  assert.equal(c.welcome.resumed, true);
  const got = [await take(sub), await take(sub)];
  assert.deepEqual(got.map((m) => m.offset), sent.map((s) => s.offset));
  assert.equal(c.gaps, 0);
  await c.close();
  await proxy.close();
});

test("URL failover: a dead first URL is skipped after a jittered backoff", async () => {
  const port = await closedPort();
  const slept = [];
  const c = new WsdClient([url("api", port), url("api")], {
    token: await token(SOCKET, "f"), backoffBase: 0.25, backoffCap: 1.0, random: () => 0.5,
    sleep: async (s) => { slept.push(s); }, connectTimeout: 10,
  });
  await c.start();
  assert.equal(c.url, url("api"));
  assert.deepEqual(slept, [0.125]); // attempt 0: 0.5 * min(1.0, 0.25)
  const sub = await c.subscribe("trading-signals");
  const [p] = await publish(1);
  assert.equal((await take(sub)).offset, p.offset);
  await c.close();
});

test("kick (4000) stops the client: Kicked after what it held, no reconnect", async () => {
  const c = await client("k");
  const sub = await c.subscribe("trading-signals");
  await publish(1);
  await waitFor(() => sub.pending() === 1, 5, "received");
  await ctl(SOCKET, "kick", { ids: [c.welcome.connection_id], reason: "bye" });
  assert.ok((await take(sub)) instanceof Message); // what was received before still comes
  await assert.rejects(take(sub), (e) => e instanceof Kicked && e.code === 4000 && /bye/.test(e.message));
  assert.equal(c.state, "closed");
  assert.equal(c.connections, 1);
  await assert.rejects(c.publish("trading-signals", {}), Kicked);
  assert.ok(c.error instanceof Kicked);
});

test("a session taken over (4011) stops the client with TakenOver", async () => {
  const t = await token(SOCKET, "to");
  const c = new WsdClient(url("api"), { token: t, ...FAST });
  await c.start();
  const sub = await c.subscribe("trading-signals");
  const other = new WebSocket(`${url("api")}?session=${c.sessionId}`, ["wsd.v1", `bearer.${t}`]);
  const hello = await new Promise((resolve) => other.addEventListener("message", (e) => resolve(JSON.parse(e.data))));
  assert.equal(hello.resumed, true);
  await assert.rejects(take(sub), (e) => e instanceof TakenOver && e.code === 4011);
  assert.equal(c.state, "closed");
  other.close(1000);
});

test("a string token that expires (4001) stops the client: nothing can renew it", async () => {
  const c = new WsdClient(url("api"), { token: await token(SOCKET, "st", { ttl: 2 }), ...FAST });
  await c.start();
  const sub = await c.subscribe("trading-signals");
  await assert.rejects(take(sub, 8), (e) => e instanceof ClientClosed && e.code === 4001);
  assert.equal(c.connections, 1);
});

test("an expired token is replaced from the function (4001) and the session resumes", async () => {
  let calls = 0;
  const c = new WsdClient(url("api"), {
    token: async () => { calls += 1; return token(SOCKET, "exp", { ttl: 2 }); }, refreshBefore: null, ...FAST,
  });
  await c.start();
  const sub = await c.subscribe("trading-signals");
  const first = c.sessionId;
  await waitFor(() => c.connections === 2 && c.state === "open", 8, "reconnected with a fresh token");
  assert.equal(calls, 2);
  assert.equal(c.sessionId, first);
  assert.equal(c.welcome.resumed, true);
  const [p] = await publish(1);
  assert.equal((await take(sub)).offset, p.offset);
  await c.close();
});

test("the token is refreshed before exp without reconnecting", async () => {
  let calls = 0;
  const c = new WsdClient(url("api"), {
    token: () => { calls += 1; return token(SOCKET, "ref", { ttl: 3 }); }, refreshBefore: 2, ...FAST,
  });
  await c.start();
  const sub = await c.subscribe("trading-signals");
  const cid = c.welcome.connection_id;
  await new Promise((r) => setTimeout(r, 3500)); // past the first token's exp (refreshed at about 1.5 s)
  assert.equal(c.connections, 1);
  assert.equal(c.state, "open");
  assert.ok(calls >= 2, `token function called ${calls} times`);
  assert.equal(c.welcome.connection_id, cid);
  const [p] = await publish(1);
  assert.equal((await take(sub)).offset, p.offset);
  await c.close();
});

test("a refreshed token the pool no longer admits (4003) stops with NotAdmitted", async () => {
  const tokens = [await token(SOCKET, "root", { roles: ["admin"], ttl: 3 }), await token(SOCKET, "root", { ttl: 60 })];
  const c = new WsdClient(url("admin"), { token: () => (tokens.length > 1 ? tokens.shift() : tokens[0]),
    refreshBefore: 2, ...FAST });
  await c.start();
  const sub = await c.subscribe("admin-events");
  await assert.rejects(take(sub, 6), (e) => e instanceof NotAdmitted && e.code === 4003);
  assert.equal(c.state, "closed");
  assert.equal(c.connections, 1);
});

test("messages outside the subscriptions go to onOther", async () => {
  const others = [];
  const c = await client("o", url("frontend"), { onOther: (m) => others.push(m) });
  assert.deepEqual(c.welcome.subscriptions, ["system-status"]);
  const sub = await c.subscribe("trading-signals");
  await ctl(SOCKET, "publish", { channel: "system-status", data: { up: true } });
  await ctl(SOCKET, "send", { connection_id: c.welcome.connection_id, type: "note", data: { hi: 1 } });
  const [p] = await publish(1);
  assert.equal((await take(sub)).offset, p.offset);
  await waitFor(() => others.length === 2, 5, "two others");
  assert.deepEqual(others.map((m) => [m.channel, m.type]).sort(), [["", "note"], ["system-status", "message"]]);
  assert.equal(c.othersDropped, 0);
  await c.close();
});

test("start() gives up after connectTimeout when the handshake never completes, without waiting for it", async () => {
  const held = [];
  const silent = net.createServer((sock) => held.push(sock)); // accepts TCP, never answers the upgrade request
  await new Promise((r) => silent.listen(0, "127.0.0.1", r));
  const c = new WsdClient(url("api", silent.address().port), { token: "x", openTimeout: 30, connectTimeout: 0.5 });
  const t0 = Date.now();
  await assert.rejects(c.start(), (e) => e instanceof ClientError && /not connected within 0.5s/.test(e.message));
  assert.ok(Date.now() - t0 < 3000, `start() took ${Date.now() - t0} ms`);
  assert.equal(c.state, "closed");
  await assert.rejects(c.publish("trading-signals", {}), ClientClosed);
  for (const sock of held) sock.destroy();
  await new Promise((r) => silent.close(r));
});

test("a refused handshake (a bad token) is retried with backoff: start() reports it after connectTimeout", async () => {
  // Browsers (and Node's WebSocket) do not expose the HTTP status of a refused handshake: 1006 is all they see.
  let attempts = 0;
  const Counting = class extends WebSocket {
    constructor(...args) {
      super(...args);
      attempts += 1;
    }
  };
  const c = new WsdClient(url("api"), { token: "not-a-jwt", backoffBase: 0.05, backoffCap: 0.1, connectTimeout: 1,
    WebSocket: Counting });
  await assert.rejects(c.start(), /not connected within 1s/);
  assert.ok(attempts >= 2, `${attempts} attempts`);
});
