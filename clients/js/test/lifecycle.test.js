// The client's lifecycle against what it cannot control: a token function that never settles, close() during
// a reconnect backoff (no server listening: Node's own WebSocket is refused), and a server that answers history
// requests with a position that never moves on. No daemon needed (tests/test_js_client.py runs this file).

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import net from "node:net";
import { test } from "node:test";

import { ClientError, WsdClient } from "../wsd-client.js";

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
