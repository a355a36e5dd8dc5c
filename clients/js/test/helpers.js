// Test helpers: the daemon's control socket, a TCP proxy that can drop or stall connections, bounded waits.
// The daemons are started by tests/test_js_client.py, which passes their addresses in WSD_* variables.

import net from "node:net";

export function env(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set: run these tests through tests/test_js_client.py`);
  return v;
}

/** One control-socket request (docs/control.md): the result, or an Error with the daemon's code. */
export function ctl(socket, method, params = {}) {
  return new Promise((resolve, reject) => {
    const s = net.createConnection(socket);
    let buf = "";
    const timer = setTimeout(() => {
      s.destroy();
      reject(new Error(`control ${method}: no reply in 10 s`));
    }, 10000);
    s.on("connect", () => s.write(JSON.stringify({ id: 1, method, params }) + "\n"));
    s.on("data", (d) => {
      buf += d;
      const nl = buf.indexOf("\n");
      if (nl < 0) return;
      clearTimeout(timer);
      s.end();
      const reply = JSON.parse(buf.slice(0, nl));
      if (reply.error) reject(Object.assign(new Error(`${reply.error.code}: ${reply.error.message}`), reply.error));
      else resolve(reply.result);
    });
    s.on("error", (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
}

/** A token signed by the daemon (`wsctl token`). */
export async function token(socket, user, { company = "acme", roles = [], ttl = 3600 } = {}) {
  return (await ctl(socket, "token", { user, company, roles, ttl_s: ttl })).token;
}

/** Wait (at most `timeout` seconds) until `pred()` is true. */
export async function waitFor(pred, timeout = 5, what = "condition") {
  const deadline = Date.now() + timeout * 1000;
  for (;;) {
    if (await pred()) return;
    if (Date.now() > deadline) throw new Error(`${what}: not met within ${timeout}s`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** The subscription's next item within `timeout` seconds (rejects on timeout). */
export function take(sub, timeout = 5) {
  let timer;
  return Promise.race([
    sub.next().then((r) => (r.done ? { done: true } : r.value)),
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`no item within ${timeout}s`)), timeout * 1000);
    }),
  ]).finally(() => clearTimeout(timer));
}

/** A TCP proxy on 127.0.0.1 to `port`: cut() drops every connection (no close frame, as a dead network does);
 *  stall() keeps them open but forwards nothing more (a network that loses every packet). */
export class Proxy {
  constructor(port) {
    this.target = port;
    this.pipes = new Set();
    this.stalled = false;
    this.server = net.createServer((client) => {
      const upstream = net.createConnection(this.target, "127.0.0.1");
      const pipe = { client, upstream };
      this.pipes.add(pipe);
      client.on("data", (d) => { if (!pipe.stalled) upstream.write(d); });
      upstream.on("data", (d) => { if (!pipe.stalled) client.write(d); });
      const end = () => {
        this.pipes.delete(pipe);
        client.destroy();
        upstream.destroy();
      };
      client.on("close", end);
      upstream.on("close", end);
      client.on("error", end);
      upstream.on("error", end);
    });
  }

  listen() {
    return new Promise((resolve) => this.server.listen(0, "127.0.0.1", () => resolve(this.server.address().port)));
  }

  cut() {
    for (const p of this.pipes) {
      p.client.resetAndDestroy();
      p.upstream.resetAndDestroy();
    }
    this.pipes.clear();
  }

  stall() {
    for (const p of this.pipes) p.stalled = true;
  }

  close() {
    this.cut();
    return new Promise((resolve) => this.server.close(resolve));
  }
}
