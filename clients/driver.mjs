// SPDX-License-Identifier: Apache-2.0
// Drive the published npm client @dylibso/wasmstore@0.3.0 for the clients section of ../test_all.py.
//
// Protocol: one JSON object per line on stdin, one answer per line on stdout (after a first {"ready": ...} line):
//   {"client": [url, branch, auth], "call": "add", "args": ["a.wasm", {"b64": "..."}]}
//   -> {"ok": <result>}  or  {"error": "<message>"}
// Special calls: "watch_open" (client.watch(), resolves once the socket is open), "watch_next" [timeoutMs]
// (next change event the client's callback received), "watch_close", "Client.prototype.auth" (see below).
//
// Environment set-up, the client itself is used unchanged:
// - Node 20 has no global WebSocket (the client's watch() needs one): provide the one from `ws`.
// - On import the client replaces the global fetch with node-fetch (asynchronously); we wait for that so every
//   call deterministically goes through node-fetch, as it does for any Node user. instantiate() is the exception:
//   Node's WebAssembly.instantiateStreaming accepts only its own (undici) Response, so instantiate() runs with the
//   native fetch, exactly as in a browser, where the client's node-fetch import fails.
import readline from "node:readline";
import { WebSocket } from "ws";

globalThis.WebSocket = WebSocket;
const nativeFetch = globalThis.fetch;
const { Client } = await import("@dylibso/wasmstore");

async function waitFor(condition, timeoutMs, what) {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error("timeout waiting for " + what);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

await waitFor(() => globalThis.fetch !== nativeFetch, 5000, "the client to install node-fetch");
const nodeFetch = globalThis.fetch;

function decodeArg(value) {
  if (value !== null && typeof value === "object" && Object.keys(value).length === 1 && "b64" in value) {
    return Buffer.from(value.b64, "base64");
  }
  return value;
}

async function describeResponse(res) {
  if (res === null) return null;
  const body = Buffer.from(await res.arrayBuffer());
  return {
    status: res.status,
    contentType: res.headers.get("content-type"),
    hashHeader: res.headers.get("wasmstore-hash"),
    b64: body.toString("base64"),
  };
}

async function instantiateWithNativeFetch(client, args) {
  globalThis.fetch = nativeFetch;
  try {
    const { instance } = await client.instantiate(...args);
    const results = {};
    for (const [name, value] of Object.entries(instance.exports)) {
      if (typeof value === "function" && value.length === 0) results[name] = value();
    }
    return results;
  } finally {
    globalThis.fetch = nodeFetch;
  }
}

// The watch state: one socket per driver process is all the tests need.
let socket = null;
const events = [];

async function watchOpen(client) {
  socket = client.watch((event) => events.push(event));
  await new Promise((resolve, reject) => {
    socket.addEventListener("open", resolve, { once: true });
    socket.addEventListener("error", (e) => reject(new Error("websocket error: " + e.message)), { once: true });
    socket.addEventListener("close", (e) => reject(new Error("websocket closed: " + e.code)), { once: true });
  });
  return socket.url;
}

async function watchNext(timeoutMs) {
  await waitFor(() => events.length > 0, timeoutMs, "a watch event");
  return events.shift();
}

async function watchClose() {
  if (socket === null) return null;
  const closed = new Promise((resolve) => socket.addEventListener("close", (e) => resolve(e.code), { once: true }));
  socket.close(1000);
  return await closed;
}

async function runCall(request) {
  const client = new Client(...(request.client || []));
  const args = (request.args || []).map(decodeArg);
  switch (request.call) {
    case "find":
      return await describeResponse(await client.find(...args));
    case "instantiate":
      return await instantiateWithNativeFetch(client, args);
    case "watch_open":
      return await watchOpen(client);
    case "watch_next":
      return await watchNext(...args);
    case "watch_close":
      return await watchClose();
    case "Client.prototype.auth":
      // The constructor's `this.auth = auth` (the key) shadows the auth() method upstream, so
      // client.auth(...) throws "is not a function"; the method is still reachable on the prototype.
      return await Client.prototype.auth.call(client, ...args);
    default:
      return await client[request.call](...args);
  }
}

process.stdout.write(JSON.stringify({ ready: true }) + "\n");
for await (const line of readline.createInterface({ input: process.stdin })) {
  let answer;
  try {
    const result = await runCall(JSON.parse(line));
    answer = { ok: result === undefined ? null : result };
  } catch (error) {
    answer = { error: String(error && error.message ? error.message : error) };
  }
  process.stdout.write(JSON.stringify(answer) + "\n");
}
if (socket !== null) socket.terminate();
