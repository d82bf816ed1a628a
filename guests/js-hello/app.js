// SPDX-License-Identifier: Apache-2.0
// js-hello: a componentize-js guest built with default options, so it imports wasi:http.
//   hello() -> "hello from js" (touches no import)
//   fetch() -> starts a fetch() of http://127.0.0.1:9/ (reaching wasi:http/outgoing-handler)
//              and returns "fetch started"
export function hello() {
  return "hello from js";
}

function fetchExport() {
  globalThis.fetch("http://127.0.0.1:9/").catch(() => {});
  return "fetch started";
}
export { fetchExport as fetch };
