// Browser clients in real headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core; never a downloaded browser). Pages are served from other origins
// (other local ports) than the stdio-sse servers they talk to:
//   1. fetch.html (a listed origin): the MCP handshake with fetch and a streamed response
//      body, with a bearer token (so CORS preflight is exercised), then a tools/call
//      whose result the page shows;
//   2. eventsource.html (a listed origin): EventSource on the legacy /sse stream (POSTs
//      to /message with fetch), and EventSource on one-shot GET /mcp?request=...;
//   3. refused.html (an origin not listed): the same fetch is refused by the browser.
// Asserts what each page shows and saves a screenshot of each.
// usage: node browser.mjs STDIO_SSE_BIN ONESHOT_FIXTURE SCREENSHOT_DIR
import { chromium } from "playwright-core";
import { spawn } from "node:child_process";
import http from "node:http";

const [bin, oneshotFixture, shots] = process.argv.slice(2);
const timer = setTimeout(() => { console.error("timed out"); process.exit(1); }, 90000);
const children = [];
process.on("exit", () => children.forEach((c) => c.kill("SIGTERM")));

function listen(server) {
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server.address().port)));
}

function startBridge(args) {
  return new Promise((resolve, reject) => {
    const child = spawn(bin, ["--port", "0", ...args], { stdio: ["ignore", "ignore", "pipe"] });
    children.push(child);
    let log = "";
    child.stderr.on("data", (d) => {
      log += d;
      const m = log.match(/listening on (http:\/\/127\.0\.0\.1:\d+)/);
      if (m) resolve(m[1]);
    });
    child.on("exit", (code) => reject(new Error(`stdio-sse exited ${code}: ${log}`)));
  });
}

// Page scripts. Each writes its outcome into #result and sets body[data-state].
const common = `
const out = (s) => { document.getElementById("result").textContent += s + "\\n"; };
const done = (state) => { document.body.dataset.state = state; };
const params = new URLSearchParams(location.search);
async function readSse(response, onMessage) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done: end } = await reader.read();
    if (end) return;
    buf += decoder.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\\n\\n")) >= 0) {
      const event = buf.slice(0, i);
      buf = buf.slice(i + 2);
      const data = event.split("\\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\\n");
      if (data && onMessage(JSON.parse(data))) { reader.cancel(); return; }
    }
  }
}
async function mcpFetch(server, token) {
  const headers = { "Content-Type": "application/json", "Accept": "application/json, text/event-stream" };
  if (token) headers["Authorization"] = "Bearer " + token;
  const init = await fetch(server + "/mcp", { method: "POST", headers, body: JSON.stringify({
    jsonrpc: "2.0", id: 1, method: "initialize",
    params: { protocolVersion: "2025-11-25", capabilities: {}, clientInfo: { name: "chromium-page", version: "1" } } }) });
  const session = init.headers.get("Mcp-Session-Id");
  let version = "";
  await readSse(init, (m) => { if (m.id === 1) { version = m.result.protocolVersion; return true; } });
  out("session " + (session ? "opened" : "MISSING") + " at " + version);
  const h2 = { ...headers, "Mcp-Session-Id": session, "MCP-Protocol-Version": version };
  await fetch(server + "/mcp", { method: "POST", headers: h2, body: JSON.stringify({ jsonrpc: "2.0", method: "notifications/initialized" }) });
  const call = await fetch(server + "/mcp", { method: "POST", headers: h2, body: JSON.stringify({
    jsonrpc: "2.0", id: 2, method: "tools/call", params: { name: "echo", arguments: { message: "hello from chromium" } } }) });
  await readSse(call, (m) => { if (m.id === 2) { out("tool result: " + m.result.content[0].text); return true; } });
  await fetch(server + "/mcp", { method: "DELETE", headers: h2 });
}
`;

const pages = {
  "/fetch.html": `
(async () => {
  try { await mcpFetch(params.get("server"), params.get("token")); done("done"); }
  catch (e) { out("error: " + e); done("error"); }
})();`,
  "/refused.html": `
(async () => {
  try { await mcpFetch(params.get("server"), params.get("token")); out("NOT refused"); done("error"); }
  catch (e) { out("refused: " + e.name + ": " + e.message); done("done"); }
})();`,
  "/eventsource.html": `
(async () => {
  try {
    // Legacy HTTP+SSE: the stream names the endpoint; answers arrive on the stream.
    const sse = params.get("sse") + "/sse";
    const es = new EventSource(sse);
    const replies = {};
    const waiting = {};
    es.addEventListener("message", (e) => { const m = JSON.parse(e.data); replies[m.id] = m; if (waiting[m.id]) waiting[m.id](m); });
    const endpoint = await new Promise((resolve, reject) => {
      es.addEventListener("endpoint", (e) => resolve(new URL(e.data, sse).href));
      es.onerror = () => reject(new Error("legacy stream failed"));
    });
    const reply = (id) => new Promise((resolve) => { if (replies[id]) resolve(replies[id]); else waiting[id] = resolve; });
    const post = (msg) => fetch(endpoint, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(msg) });
    await post({ jsonrpc: "2.0", id: 1, method: "initialize", params: { protocolVersion: "2024-11-05", capabilities: {}, clientInfo: { name: "chromium-es", version: "1" } } });
    const init = await reply(1);
    out("legacy session at " + init.result.protocolVersion);
    await post({ jsonrpc: "2.0", method: "notifications/initialized" });
    await post({ jsonrpc: "2.0", id: 2, method: "tools/call", params: { name: "echo", arguments: { message: "legacy via EventSource" } } });
    out("legacy tool result: " + (await reply(2)).result.content[0].text);
    es.close();
    // One-shot: GET /mcp?request=<url-encoded JSON>, one child per request.
    const request = JSON.stringify({ jsonrpc: "2.0", id: "os-1", params: { message: "one-shot via EventSource" } });
    const os = new EventSource(params.get("oneshot") + "/mcp?request=" + encodeURIComponent(request));
    const first = await new Promise((resolve, reject) => {
      os.onmessage = (e) => resolve(JSON.parse(e.data));
      os.onerror = () => reject(new Error("one-shot stream failed"));
    });
    os.close();
    out("one-shot result: " + first.result.echo);
    done("done");
  } catch (e) { out("error: " + e); done("error"); }
})();`,
};

function pageServer() {
  return http.createServer((req, res) => {
    const path = new URL(req.url, "http://x").pathname;
    if (!pages[path]) { res.writeHead(404); res.end(); return; }
    res.writeHead(200, { "Content-Type": "text/html; charset=utf-8" });
    res.end(`<!doctype html><html><head><title>${path}</title></head>
<body data-state="running"><h1>stdio-sse from another origin: ${path}</h1>
<pre id="result"></pre><script>${common}\n${pages[path]}</script></body></html>`);
  });
}

const listed = pageServer();
const listedPort = await listen(listed);
const other = pageServer();
const otherPort = await listen(other);
const listedOrigin = `http://127.0.0.1:${listedPort}`;

const token = "browser-token-" + Math.random().toString(36).slice(2);
const withAuth = await startBridge(["--auth-token", token, "--cors-origin", listedOrigin]);
const legacy = await startBridge(["--cors-origin", listedOrigin]);
const oneshot = await startBridge(["--mode", "oneshot", "--cors-origin", listedOrigin, "--", "python3", oneshotFixture]);

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});
const failures = [];
async function visit(name, url, expected) {
  const page = await browser.newPage();
  await page.goto(url);
  await page.waitForFunction(() => document.body.dataset.state !== "running", null, { timeout: 30000 });
  const state = await page.evaluate(() => document.body.dataset.state);
  const text = await page.textContent("#result");
  await page.screenshot({ path: `${shots}/browser-${name}.png` });
  const missing = expected.filter((e) => !text.includes(e));
  if (state !== "done" || missing.length) failures.push(`${name}: state=${state}, missing ${JSON.stringify(missing)} in ${JSON.stringify(text)}`);
  await page.close();
  return text.trim().split("\n").pop();
}

const shown = [];
shown.push(await visit("fetch", `${listedOrigin}/fetch.html?server=${encodeURIComponent(withAuth)}&token=${token}`,
  ["session opened at 2025-11-25", "tool result: hello from chromium"]));
shown.push(await visit("eventsource", `${listedOrigin}/eventsource.html?sse=${encodeURIComponent(legacy)}&oneshot=${encodeURIComponent(oneshot)}`,
  ["legacy session at 2024-11-05", "legacy tool result: legacy via EventSource", "one-shot result: one-shot via EventSource"]));
shown.push(await visit("refused", `http://127.0.0.1:${otherPort}/refused.html?server=${encodeURIComponent(withAuth)}&token=${token}`,
  ["refused: TypeError: Failed to fetch"]));
await browser.close();
listed.close();
other.close();
clearTimeout(timer);
if (failures.length) { console.error(failures.join("\n")); process.exit(1); }
console.log(`ok chromium: ${shown.join(" | ")}`);
process.exit(0);
