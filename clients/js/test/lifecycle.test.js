// The client against what it cannot control: a token function that never settles, close() during a reconnect
// backoff (no server listening: Node's own WebSocket is refused), and a buggy or hostile server (history pages
// that never move on, junk frames, an epoch change, a drop mid-request). No daemon needed
// (tests/test_js_client.py runs this file).

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import net from "node:net";
import { test } from "node:test";

import { ClientError, ConnectionLost, WsdClient } from "../wsd-client.js";

const CLIENT = new URL("../wsd-client.js", import.meta.url).href;

/** A TCP port nothing listens on (bound, then closed): connections to it are refused at once. */
function closedPort() {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** `promise`, or a rejection after `ms` saying it did not settle. */
function bounded(promise, ms, what) {
  let timer;
  return Promise.race([promise, new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not settle within ${ms} ms`)), ms);
  })]).finally(() => clearTimeout(timer));
}

/** The global WebSocket, counting the sockets made. */
function counting() {
  const made = [];
  const Base = globalThis.WebSocket;
  class Counted extends Base {
    constructor(url, protocols) {
      super(url, protocols);
      made.push(url);
    }
  }
  return { made, WebSocket: Counted };
}

test("a token function that never settles does not hang start({connectTimeout}) or close()", async () => {
  const port = await closedPort();
  const url = `ws://127.0.0.1:${port}/ws/api`;
  let release;
  const late = new Promise((resolve) => { release = resolve; });
  const { made, WebSocket } = counting();
  const a = new WsdClient(url, { token: () => late, connectTimeout: 0.3, WebSocket });
  await assert.rejects(bounded(a.start(), 3000, "start()"), (err) => err instanceof ClientError
    && /not connected within 0.3s/.test(err.message));
  assert.equal(a.state, "closed");

  const b = new WsdClient(url, { token: () => late, WebSocket });
  const started = b.start();
  started.catch(() => {});
  await new Promise((r) => setTimeout(r, 100));
  await bounded(b.close(), 3000, "close()");
  assert.equal(b.state, "closed");
  await assert.rejects(bounded(started, 3000, "start() after close()"), /stopped before connecting/);
  // The token arriving after close() opens nothing.
  release("header.payload.sig");
  await new Promise((r) => setTimeout(r, 100));
  assert.deepEqual(made, []);
});

test("close() during a reconnect backoff stops the client for good and leaves no timer: Node exits", async () => {
  const port = await closedPort();
  // A 30 s backoff after the first refused attempt; close() 300 ms in. The process must exit at once after it.
  const script = `
    import { WsdClient } from ${JSON.stringify(CLIENT)};
    let sockets = 0;
    class Counted extends WebSocket { constructor(u, p) { super(u, p); sockets += 1; } }
    const c = new WsdClient("ws://127.0.0.1:${port}/ws/api", { token: "t", WebSocket: Counted,
      backoffBase: 30, backoffCap: 30, random: () => 1 });
    c.start().catch(() => {});
    await new Promise((r) => setTimeout(r, 300));
    await c.close();
    process.on("exit", () => console.log(JSON.stringify({ sockets, state: c.state })));
  `;
  const t0 = Date.now();
  const r = spawnSync(process.execPath, ["--experimental-websocket", "--input-type=module", "-e", script],
    { encoding: "utf8", timeout: 20000 });
  const took = Date.now() - t0;
  assert.equal(r.status, 0, `node exited ${r.status} (${r.signal}):\n${r.stdout}\n${r.stderr}`);
  assert.ok(took < 5000, `the process took ${took} ms to exit after close(): a timer outlived the client`);
  assert.deepEqual(JSON.parse(r.stdout.trim().split("\n").pop()), { sockets: 1, state: "closed" });
});

// -------------------------------------------------------------------------------------- a hostile or buggy server

/**
 * A scripted server behind the `WebSocket` option (any constructor with the browser's API): each socket is
 * welcomed at once; `answer(ws, frame)` replies to what the client sends; `ws.push(obj)` sends it a frame.
 */
function scripted(answer) {
  const sockets = [];
  class Scripted extends EventTarget {
    constructor(url) {
      super();
      this.url = url;
      this.sent = [];
      sockets.push(this);
      setTimeout(() => this.push({ type: "welcome", session_id: "s1", resumed: false, subscriptions: [] }), 1);
    }

    push(obj) {
      if (this.closed) return;
      const data = typeof obj === "string" ? obj : JSON.stringify(obj);
      this.dispatchEvent(Object.assign(new Event("message"), { data }));
    }

    send(text) {
      const frame = JSON.parse(text);
      this.sent.push(frame);
      setTimeout(() => answer(this, frame), 0);
    }

    close(code) {
      if (this.closed) return;
      this.closed = true;
      setTimeout(() => this.dispatchEvent(Object.assign(new Event("close"), { code: code ?? 1005, reason: "" })), 0);
    }
  }
  return { sockets, WebSocket: Scripted };
}

const at = (offset, epoch = "e1") => ({ offset, epoch });
const message = (offset, epoch = "e1") => ({ type: "message", channel: "ch/a", offset, epoch, msg_type: "m",
  data: { offset } });

test("a history reply whose next does not move on ends the fill with a Gap instead of asking forever", async () => {
  let history = 0;
  const { sockets, WebSocket } = scripted((ws, f) => {
    if (f.op === "subscribe") ws.push({ id: f.id, ok: true, result: { channel: "ch/a", position: at(1) } });
    if (f.op === "history") {
      history += 1;
      ws.push({ id: f.id, ok: true, result: { channel: "ch/a", messages: [], more: true, next: f.since,
        position: at(9) } });
    }
  });
  const client = new WsdClient("ws://wsd.invalid/ws/api", { token: "t", WebSocket, pingInterval: null });
  try {
    await client.start();
    const sub = await client.subscribe("ch/a");
    const items = [];
    sub.on("message", (m) => items.push(`m${m.offset}`));
    sub.on("gap", (g) => items.push(`gap ${g.reason}`));
    sockets[0].push(message(2));
    sockets[0].push(message(5)); // 3 and 4 missing: a fill, whose pages never get past offset 2
    const deadline = Date.now() + 3000;
    while (items.length < 3 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    assert.deepEqual(items.slice(0, 2), ["m2", "gap history since offset 2 of epoch e1 did not move on "
      + "(next: offset 2 of epoch e1)"]);
    assert.equal(items[2], "m5");
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(history, 1, `${history} history requests for one hole`);
  } finally {
    await client.close();
  }
});

test("junk from the server is ignored; an epoch change is a Gap; a drop mid-request settles the request", async () => {
  let publishes = 0;
  const { sockets, WebSocket } = scripted((ws, f) => {
    if (f.op === "subscribe") ws.push({ id: f.id, ok: true, result: { channel: "ch/a", position: at(1) } });
    if (f.op === "history") ws.push({ id: f.id, ok: true, result: { channel: "ch/a", messages: [], more: false } });
    if (f.op === "publish") publishes += 1; // never answered: the connection drops first
  });
  const client = new WsdClient("ws://wsd.invalid/ws/api", { token: "t", WebSocket, pingInterval: null,
    backoffBase: 0.01, backoffCap: 0.01 });
  try {
    await client.start();
    const sub = await client.subscribe("ch/a");
    const items = [];
    sub.on("message", (m) => items.push(`m${m.offset}@${m.epoch}`));
    sub.on("gap", (g) => items.push(`gap ${g.reason}`));
    const ws = sockets[0];
    for (const junk of ["not json", "[1,2]", "null", "42", '"text"', { id: 999, ok: true, result: {} },
      { type: "batch", messages: "x" }, { type: "batch", messages: [{ type: "batch", messages: [message(2)] }] },
      { type: "no-such-frame" }, { type: "message", channel: { a: 1 }, offset: 2 }]) ws.push(junk);
    ws.push(message(2));
    ws.push(message(1, "e2")); // the channel's history was lost: a new epoch
    ws.push(message(2, "e2"));
    const deadline = Date.now() + 3000;
    while (items.length < 4 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    assert.deepEqual(items, ["m2@e1", "gap epoch changed from e1 to e2: the channel's history was lost", "m1@e2",
      "m2@e2"]);
    assert.equal(client.state, "open");
    const pending = client.publish("ch/a", { n: 1 });
    while (publishes < 1 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    ws.close(1006);
    await assert.rejects(bounded(pending, 3000, "publish() on a dropped connection"), ConnectionLost);
  } finally {
    await client.close();
  }
});

test("an async listener that rejects is reported like one that throws (not acked), not left to crash Node",
  async () => {
  const { sockets, WebSocket } = scripted((ws, f) => {
    if (f.op === "subscribe") ws.push({ id: f.id, ok: true, result: { channel: "ch/a", position: at(1) } });
  });
  const unhandled = [];
  const onUnhandled = (err) => unhandled.push(err);
  process.on("unhandledRejection", onUnhandled);
  const logged = [];
  const consoleError = console.error;
  console.error = (...args) => logged.push(args.map(String).join(" "));
  const client = new WsdClient("ws://wsd.invalid/ws/api", { token: "t", WebSocket, pingInterval: null });
  try {
    await client.start();
    const sub = await client.subscribe("ch/a");
    const seen = [];
    sub.on("message", async (m) => {
      seen.push(m.offset);
      await new Promise((r) => setTimeout(r, 10));
      if (m.offset !== 2) throw new Error(`cannot store ${m.offset}`);
    });
    sub.on("gap", async () => { throw new Error("gap listener failed"); });
    sockets[0].push({ ...message(2), seq: 10 });
    sockets[0].push({ ...message(3), seq: 11 });
    sockets[0].push({ ...message(1, "e2"), seq: 12 });
    const deadline = Date.now() + 3000;
    while (logged.length < 3 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    await new Promise((r) => setTimeout(r, 50));
    assert.deepEqual(seen, [2, 3, 1]);
    assert.deepEqual(unhandled, []);
    assert.equal(logged.length, 3, logged.join("\n")); // messages 3 and 1, the gap
    // acked once its listener's promise resolved; never when it rejected (the server sends it again)
    assert.deepEqual(sockets[0].sent.filter((f) => f.op === "ack").map((f) => f.seq), [10]);
    assert.ok(logged.every((line) => line.startsWith("wsd-client: ")), logged.join("\n"));
    assert.equal(client.state, "open");
  } finally {
    console.error = consoleError;
    process.off("unhandledRejection", onUnhandled);
    await client.close();
  }
});
