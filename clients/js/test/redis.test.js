// Two wsd nodes on one Redis (started by tests/test_js_client.py): WSD_PORT_A, WSD_PORT_B, WSD_SOCKET_B and
// WSD_PID_A (node A's process, killed here with SIGKILL: a dying node, no close frame, no drain).

import assert from "node:assert/strict";
import { test } from "node:test";

import { WsdClient } from "../wsd-client.js";
import { ctl, env, take, token, waitFor } from "./helpers.js";

const url = (port) => `ws://127.0.0.1:${port}/ws/api`;
const SOCKET_B = env("WSD_SOCKET_B");
const CH = "trading-signals/acme";

test("a killed node: the client fails over to the next URL, resumes, loses nothing and repeats nothing", async () => {
  let open;
  const gate = new Promise((r) => { open = r; });
  const urls = [url(env("WSD_PORT_A")), url(env("WSD_PORT_B"))];
  const c = new WsdClient(urls, { token: await token(SOCKET_B, "fo"), sleep: () => gate, connectTimeout: 10,
    requestTimeout: 5 });
  await c.start();
  assert.equal(c.url, urls[0]);
  const sub = await c.subscribe("trading-signals");
  const p1 = await ctl(SOCKET_B, "publish", { channel: CH, data: { n: 1 } }); // through the other node
  assert.equal((await take(sub)).offset, p1.offset);
  const first = c.sessionId;
  process.kill(Number(env("WSD_PID_A")), "SIGKILL");
  await waitFor(() => c.state === "connecting", 10, "the drop noticed");
  const sent = [];
  for (let i = 2; i <= 3; i++) sent.push(await ctl(SOCKET_B, "publish", { channel: CH, data: { n: i } }));
  open(); // A refuses now: the client moves on to B after a backoff (here: at once)
  const got = [await take(sub, 10), await take(sub, 10)];
  assert.deepEqual(got.map((m) => [m.kind, m.offset, m.data]), sent.map((s, i) => ["message", s.offset, { n: i + 2 }]));
  assert.equal(c.url, urls[1]);
  assert.equal(c.sessionId, first);
  assert.equal(c.welcome.resumed, true);
  const p4 = await ctl(SOCKET_B, "publish", { channel: CH, data: { n: 4 } });
  assert.equal((await take(sub)).offset, p4.offset);
  assert.equal(c.gaps, 0);
  assert.equal(sub.pending(), 0);
  await c.close();
});
