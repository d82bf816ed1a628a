// SPDX-License-Identifier: Apache-2.0
// js-http: a JavaScript fetch handler, built by guests/build.sh with jco 1.35.0
// (componentize-js 0.22.0) for the wasi:http/proxy world of wit/wasi-http-0.2.10:
//   GET  /            200 "hello from js\n" (content-type: text/plain)
//   ANY  /echo...     200 "<METHOD> <path?query>\n" + "<name>: <value>\n" for each x-* request
//                     header (sorted) + "\n" + the request body; content-type: text/plain
//   GET  /fetch?url=U 200 with U's status line and body, fetched with fetch() (an outgoing
//                     request); 502 "fetch failed: <message>\n" when the fetch fails
//   GET  /throw       the handler throws (the runtime answers 500)
//   anything else     404 "not found\n"
addEventListener("fetch", (event) => event.respondWith(handle(event.request)));

async function handle(request) {
  const url = new URL(request.url);
  const text = { "content-type": "text/plain" };
  if (url.pathname === "/") {
    return new Response("hello from js\n", { headers: text });
  }
  if (url.pathname.startsWith("/echo")) {
    const names = [...request.headers.keys()].filter((name) => name.startsWith("x-")).sort();
    const lines = names.map((name) => `${name}: ${request.headers.get(name)}\n`).join("");
    const body = ["GET", "HEAD"].includes(request.method) ? "" : await request.text();
    return new Response(`${request.method} ${url.pathname}${url.search}\n${lines}\n${body}`, { headers: text });
  }
  if (url.pathname === "/fetch") {
    try {
      const upstream = await fetch(url.searchParams.get("url"));
      const body = await upstream.text();
      return new Response(`${upstream.status}\n${body}`, { headers: text });
    } catch (error) {
      return new Response(`fetch failed: ${error.message}\n`, { status: 502, headers: text });
    }
  }
  if (url.pathname === "/throw") {
    throw new Error("thrown on purpose");
  }
  return new Response("not found\n", { status: 404, headers: text });
}
