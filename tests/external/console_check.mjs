// The console (GET /) in real headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core), against stdio-sse wrapping @modelcontextprotocol/server-everything:
//   1. without auth: the page connects by itself and shows the negotiated protocol
//      version; lists tools; fills echo's and get-sum's forms and calls them; a long
//      operation's progress shows as it streams; answers an elicitation form (the
//      server's trigger-elicitation-request) and a sampling request from the page; the
//      Disconnect button ends the session (DELETE); then 2026-07-28 (stateless) from the
//      version picker: a tool called, an input_required elicitation answered;
//   2. with --auth-token: the page asks for the token, connects with it, calls a tool;
//      the token is in no URL, storage or cookie;
//   3. with --config (server-everything and the built-in demo): the picker offers the
//      merged endpoint and each server; a server picked, its tool called.
// Every request the page makes is recorded: any to another origin fails the check, as
// does any Content-Security-Policy violation or script error. Screenshots go to SHOTS;
// the elicitation one is also written to DOC_SHOT (docs/console.png; - : not written).
// Also: roots/list answered with an edited list (get-roots-list shows it).
// usage: node console_check.mjs STDIO_SSE_BIN NODE SERVER_EVERYTHING_JS SHOTS DOC_SHOT
import { chromium } from "playwright-core";
import { spawn } from "node:child_process";
import fs from "node:fs";

const [bin, node, everything, shots, docShot] = process.argv.slice(2);
const timer = setTimeout(() => { console.error("timed out"); process.exit(1); }, 150000);
const children = [];
process.on("exit", () => children.forEach((c) => c.kill("SIGTERM")));
fs.mkdirSync(shots, { recursive: true });

function startBridge(args) {
  return new Promise((resolve, reject) => {
    const child = spawn(bin, ["--port", "0", ...args, "--", node, everything, "stdio"], { stdio: ["ignore", "ignore", "pipe"] });
    children.push(child);
    let log = "";
    child.stderr.on("data", (d) => {
      log += d;
      const m = log.match(/listening on (http:\/\/127\.0\.0\.1:\d+)/);
      if (m) resolve({ url: m[1], log: () => log });
    });
    child.on("exit", (code) => reject(new Error(`stdio-sse exited ${code}: ${log}`)));
  });
}

const failures = [];
const check = (ok, what) => { if (!ok) failures.push(what); console.log(`${ok ? "ok  " : "FAIL"} ${what}`); };

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});

// A page that records every request it makes and every CSP violation or script error.
async function open(origin) {
  const context = await browser.newContext({ viewport: { width: 1400, height: 860 } });
  const page = await context.newPage();
  const requests = [], problems = [];
  page.on("request", (r) => requests.push({ method: r.method(), url: r.url(), headers: r.headers() }));
  page.on("console", (m) => { if (m.type() === "error") problems.push(m.text()); });
  page.on("pageerror", (e) => problems.push(String(e)));
  // Which request a "Failed to load resource" was: the browser's message does not say.
  page.on("response", (r) => {
    if (r.status() >= 400 && r.status() !== 401)
      problems.push(`(${r.request().method()} ${new URL(r.url()).pathname} ${(r.request().postData() || "").slice(0, 80)} answered ${r.status()})`);
  });
  await page.goto(origin + "/");
  return { page, context, requests, problems };
}
function sameOrigin(run, origin) {
  const foreign = run.requests.filter((r) => new URL(r.url).origin !== origin);
  check(foreign.length === 0, `every one of the page's ${run.requests.length} requests went to ${origin}` +
    (foreign.length ? `; not these: ${foreign.map((r) => r.url).join(", ")}` : ""));
  check(run.problems.length === 0, "no CSP violation or script error" + (run.problems.length ? `: ${run.problems.join(" | ")}` : ""));
}
async function callTool(page, name, fill) {
  await page.click(`#list li[data-name="${name}"]`);
  await page.waitForSelector(`#detail h2`);
  for (const [field, value] of Object.entries(fill)) await page.fill(`#detail [name="${field}"]`, value);
  await page.click("#run");
}
const resultText = (page) => page.locator("#result").innerText();
const ROOTS_ASK = '.ask[data-method="roots/list"]';
async function answerRoots(page) {
  const card = page.locator(ROOTS_ASK).first();
  await card.locator("textarea").fill("file:///tmp/project\nfile:///srv/data");
  await card.locator("button", { hasText: "Send" }).click();
}
// Waits for `selector`, answering the roots/list questions server-everything asks on
// the way (at its start, and from a 2026-07-28 carrier's fresh child at any call).
async function answeringRoots(page, selector) {
  for (let round = 0; round < 5; round++) {
    await page.locator(`${selector}, ${ROOTS_ASK}`).first().waitFor({ timeout: 20000 });
    if (await page.locator(selector).count()) return;
    await answerRoots(page);
  }
  await page.locator(selector).first().waitFor({ timeout: 20000 });
}

// ---- 1. without auth --------------------------------------------------------------
{
  const bridge = await startBridge([]);
  const run = await open(bridge.url);
  const { page } = run;
  await page.waitForSelector("body[data-state=connected]", { timeout: 30000 });
  const status = await page.locator("#status").innerText();
  check(/protocol 2025-11-25/.test(status), `the status shows the negotiated protocol version ("${status}")`);
  await page.waitForSelector('#list li[data-name="echo"]');
  const names = await page.locator("#list li").evaluateAll((lis) => lis.map((li) => li.dataset.name));
  check(names.includes("get-sum"), `tools listed: ${names.length} (${names.slice(0, 5).join(", ")}, …)`);

  await callTool(page, "echo", { message: "hello from the console" });
  await page.waitForSelector("#result");
  check((await resultText(page)).includes("Echo: hello from the console"), "echo called from its form: the result shows");

  await callTool(page, "get-sum", { a: "2", b: "40" });
  await page.waitForSelector("#result");
  check((await resultText(page)).includes("The sum of 2 and 40 is 42."), "get-sum called with numbers from its form");

  // A prompt with its arguments, and a resource read.
  await page.click('.tabs button[data-tab="prompts"]');
  await page.click('#list li[data-name="args-prompt"]');
  await page.fill('#detail [name="city"]', "Paris");
  await page.click("#run");
  await page.waitForSelector("#result");
  check((await resultText(page)).includes("What's weather in Paris?"), "prompts listed, args-prompt got with its argument");
  await page.click('.tabs button[data-tab="resources"]');
  await page.waitForSelector("#list li[data-name]");
  const resourceCount = await page.locator("#list li[data-name]").count();
  await page.locator("#list li[data-name]").first().click();
  await page.click("#run");
  await page.waitForSelector("#result");
  check((await resultText(page)).includes("demo://resource/"), `resources listed (${resourceCount} with templates), the first read`);
  await page.click('.tabs button[data-tab="tools"]');
  await page.waitForSelector('#list li[data-name="echo"]');

  await callTool(page, "trigger-long-running-operation", { duration: "1", steps: "3" });
  await page.waitForSelector("#result", { timeout: 20000 });
  const notes = await page.locator("#out .notes li").allInnerTexts();
  check(notes.filter((n) => n.startsWith("progress")).length >= 2 && (await resultText(page)).includes("Steps: 3"),
    `progress shown as it streamed (${notes.length} notes), then the result`);
  await page.screenshot({ path: `${shots}/console-progress.png` });

  // server-everything asks for the client's roots once initialized: the person answers
  // with an edited list, and the tool that shows them sees it.
  await page.locator(ROOTS_ASK).first().waitFor({ timeout: 20000 });
  await answerRoots(page);
  await page.waitForSelector('#list li[data-name="get-roots-list"]', { timeout: 20000 });
  await callTool(page, "get-roots-list", {});
  await answeringRoots(page, "#result");
  const rootsShown = await resultText(page);
  check(rootsShown.includes("file:///tmp/project") && rootsShown.includes("file:///srv/data"), "roots/list answered from the page with an edited list");

  // Registered by server-everything once the client declared elicitation: the list
  // changes after initialize, and the page lists again.
  await page.waitForSelector('#list li[data-name="trigger-elicitation-request"]', { timeout: 20000 });
  await callTool(page, "trigger-elicitation-request", {});
  const ask = page.locator('.ask[data-method="elicitation/create"]');
  await ask.waitFor({ timeout: 20000 });
  await ask.locator('[name="name"]').fill("Ada Lovelace");
  await ask.locator('[name="email"]').fill("ada@example.org");
  await page.screenshot({ path: `${shots}/console-elicitation.png` });
  await ask.locator("button", { hasText: "Accept" }).click();
  await page.waitForSelector("#result", { timeout: 20000 });
  const elicited = await resultText(page);
  check(elicited.includes("Name: Ada Lovelace") && elicited.includes("Email: ada@example.org"),
    "an elicitation form answered from the page reached the tool");
  await page.locator("#result details").first().evaluate((d) => { d.open = true; });
  await page.locator("#log details.msg").last().evaluate((d) => { d.open = true; });
  await page.screenshot({ path: `${shots}/console-elicitation-result.png` });
  if (docShot && docShot !== "-") fs.copyFileSync(`${shots}/console-elicitation.png`, docShot);

  await callTool(page, "trigger-sampling-request", { prompt: "Say hi" });
  const sample = page.locator('.ask[data-method="sampling/createMessage"]');
  await sample.waitFor({ timeout: 20000 });
  await sample.locator("textarea").fill("Hi, from the person playing the model.");
  await sample.locator("button", { hasText: "Send reply" }).click();
  await page.waitForSelector("#result", { timeout: 20000 });
  check((await resultText(page)).includes("Hi, from the person playing the model."), "a sampling request answered from the page");

  await page.click("#disc");
  await page.waitForSelector("body[data-state=disconnected]");
  const deletes = run.requests.filter((r) => r.method === "DELETE" && r.headers["mcp-session-id"]);
  check(deletes.length === 1, "Disconnect sent DELETE with the session id");
  const posts = run.requests.filter((r) => r.method === "POST").length;
  const logged = (bridge.log().match(/access: (\[\w+\] )?method=POST path=\/mcp /g) || []).length;
  check(logged >= posts && posts > 0, `the access log shows the page's requests like any client's (${posts} POSTs, ${logged} logged)`);

  // 2026-07-28 from the version picker: no session; the elicitation comes back as an
  // input_required result, answered in the page and sent on the retry.
  const before = run.requests.length;
  await page.selectOption("#ver", "2026-07-28");
  await page.click("#conn");
  await page.waitForSelector("body[data-state=connected]", { timeout: 30000 });
  const modernStatus = await page.locator("#status").innerText();
  check(/protocol 2026-07-28/.test(modernStatus), `2026-07-28 chosen: the status says so ("${modernStatus}")`);
  await page.waitForSelector('#list li[data-name="echo"]');
  await callTool(page, "echo", { message: "stateless hello" });
  await answeringRoots(page, "#result");
  check((await resultText(page)).includes("Echo: stateless hello"), "2026-07-28: echo called");
  await page.waitForSelector('#list li[data-name="trigger-elicitation-request"]', { timeout: 20000 });
  await callTool(page, "trigger-elicitation-request", {});
  const modernAsk = page.locator('.ask[data-method="elicitation/create"]');
  await answeringRoots(page, '.ask[data-method="elicitation/create"]');
  await modernAsk.locator('[name="name"]').fill("Grace Hopper");
  await modernAsk.locator("button", { hasText: "Accept" }).click();
  // The child may ask for the roots too: another input_required, answered the same way.
  await answeringRoots(page, "#result");
  check((await resultText(page)).includes("Name: Grace Hopper"), "2026-07-28: an input_required elicitation answered from the page on the retry");
  await page.screenshot({ path: `${shots}/console-modern.png` });
  const modernPosts = run.requests.slice(before).filter((r) => r.method === "POST");
  check(modernPosts.length > 0 && modernPosts.every((r) => !r.headers["mcp-session-id"] && r.headers["mcp-method"]),
    `2026-07-28: ${modernPosts.length} POSTs, each with Mcp-Method and none with a session`);
  sameOrigin(run, bridge.url);
  await run.context.close();
}

// ---- 2. with --auth-token -----------------------------------------------------------
{
  const token = "console-check-token-7f3a";
  const bridge = await startBridge(["--auth-token", token]);
  const run = await open(bridge.url);
  const { page } = run;
  await page.waitForSelector("#tokbar:not([hidden])");
  await page.screenshot({ path: `${shots}/console-token.png` });
  await page.fill("#tok", token);
  await page.click("#conn");
  await page.waitForSelector("body[data-state=connected]", { timeout: 30000 });
  await page.waitForSelector('#list li[data-name="echo"]');
  await callTool(page, "echo", { message: "with a token" });
  await page.waitForSelector("#result");
  check((await resultText(page)).includes("Echo: with a token"), "with --auth-token: the token entered in the page, a tool called");
  const kept = await page.evaluate(() => [localStorage.length, sessionStorage.length, document.cookie, location.href, document.body.innerHTML.includes("console-check-token")]);
  check(kept[0] === 0 && kept[1] === 0 && kept[2] === "" && !kept[3].includes(token) && !kept[4],
    "the token is in no storage, cookie, URL or the page's markup");
  const bearer = run.requests.filter((r) => (r.headers.authorization || "") === `Bearer ${token}`).length;
  check(bearer > 0 && run.requests.every((r) => !r.url.includes(token)), `the token went only in Authorization headers (${bearer} requests)`);
  await page.screenshot({ path: `${shots}/console-auth.png` });
  sameOrigin(run, bridge.url);
  await run.context.close();
}

// ---- 3. --config with two servers: a picker of each and the merged endpoint ----------
{
  const conf = `${shots}/console-servers.json`;
  fs.writeFileSync(conf, JSON.stringify({ mcpServers: {
    everything: { command: node, args: [everything, "stdio"] },
    demo: { command: bin, args: ["__demo-server"] },
  } }));
  const child = spawn(bin, ["--port", "0", "--config", conf], { stdio: ["ignore", "ignore", "pipe"] });
  children.push(child);
  const url = await new Promise((resolve, reject) => {
    let log = "";
    child.stderr.on("data", (d) => { log += d; const m = log.match(/listening on (http:\/\/127\.0\.0\.1:\d+)/); if (m) resolve(m[1]); });
    child.on("exit", (code) => reject(new Error(`stdio-sse --config exited ${code}: ${log}`)));
  });
  const run = await open(url);
  const { page } = run;
  await page.waitForSelector("body[data-state=connected]", { timeout: 30000 });
  const options = await page.locator("#ep option").evaluateAll((os) => os.map((o) => o.value));
  check(!(await page.locator("#ep").isHidden()) && ["/mcp", "/servers/everything/mcp", "/servers/demo/mcp"].every((v) => options.includes(v)),
    `--config: the picker offers the merged endpoint and each server (${options.join(", ")})`);
  await page.waitForSelector('#list li[data-name="demo__add"]', { timeout: 20000 });
  await page.selectOption("#ep", "/servers/demo/mcp");
  await page.waitForSelector('#list li[data-name="add"]', { timeout: 20000 });
  await callTool(page, "add", { a: "20", b: "22" });
  await page.waitForSelector("#result");
  const added = await resultText(page);
  check(/42/.test(added) && run.requests.some((r) => r.url.endsWith("/servers/demo/mcp")),
    "--config: the merged endpoint lists demo__add; the demo server picked, its add called on /servers/demo/mcp");
  await page.screenshot({ path: `${shots}/console-config.png` });
  sameOrigin(run, url);
  await run.context.close();
}

await browser.close();
clearTimeout(timer);
if (failures.length) {
  console.error(`${failures.length} failed: ${failures.join("; ")}`);
  process.exit(1);
}
console.log("console: tools listed and called from forms, progress, elicitation and sampling answered, token kept in memory, no other origin");
process.exit(0);
