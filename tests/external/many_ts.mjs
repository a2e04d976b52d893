// Many servers behind one port (--config FILE), through the official TypeScript SDK
// (npm @modelcontextprotocol/sdk 1.x) Client, over StreamableHTTPClientTransport and
// SSEClientTransport.
// usage: node many_ts.mjs merged|fixture BASE_URL
//   merged   /mcp and /sse: every tool NAME__tool, each of everything, time and fixture
//            represented, one call routed to each, the fixture's filtered tools absent
//            and their calls refused with -32602 "Unknown tool".
//   fixture  /servers/fixture/mcp and /servers/fixture/sse: its tools, one call, the
//            filtered tools absent and refused.
// The instance serves the three-server file run.sh writes (see many_check.py).
// Prints one line and exits 0 on success.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { SSEClientTransport } from "@modelcontextprotocol/sdk/client/sse.js";
import { McpError } from "@modelcontextprotocol/sdk/types.js";

const [which, base] = process.argv.slice(2);
const timer = setTimeout(() => { console.error("timed out"); process.exit(1); }, 60000);
const SEP = "__";
const SERVERS = ["everything", "time", "fixture"];
const CALLS = {
  everything: ["echo", { message: "hi from many_ts" }, "Echo: hi from many_ts"],
  time: ["get_current_time", { timezone: "UTC" }, '"timezone": "UTC"'],
  fixture: ["test_simple_text", {}, "This is a simple text response for testing."],
};
const HIDDEN = ["echo", "test_elicitation", "test_elicitation_sep1034_defaults", "test_elicitation_sep1330_enums"];

function check(ok, what) { if (!ok) throw new Error(what); }
const textOf = (r) => r.content.map((c) => c.text ?? "").join(" ");

async function connect(kind, url) {
  const client = new Client({ name: "stdio-sse-many-ts", version: "1.0.0" });
  const transport = kind === "streamable"
    ? new StreamableHTTPClientTransport(new URL(url))
    : new SSEClientTransport(new URL(url));
  await client.connect(transport);
  return { client, transport };
}

async function close({ client, transport }) {
  if (transport.terminateSession) await transport.terminateSession();
  await client.close();
}

async function allTools(client) {
  let tools = [], cursor;
  for (let i = 0; i < 50; i++) {
    const page = await client.listTools(cursor ? { cursor } : undefined);
    tools = tools.concat(page.tools);
    cursor = page.nextCursor;
    if (!cursor) return tools.map((t) => t.name);
  }
  throw new Error("tools/list never stopped paging");
}

async function called(client, name, args, want) {
  const r = await client.callTool({ name, arguments: args });
  const text = textOf(r);
  check(!r.isError, `tools/call ${name}: isError: ${JSON.stringify(text)}`);
  check(text.includes(want), `tools/call ${name}: expected ${JSON.stringify(want)} in ${JSON.stringify(text)}`);
}

async function refused(client, name, args = {}) {
  let r;
  try {
    r = await client.callTool({ name, arguments: args });
  } catch (e) {
    check(e instanceof McpError && e.code === -32602 && e.message.includes("Unknown tool"),
      `tools/call ${name}: expected McpError -32602 "Unknown tool...", got ${e.name} ${e.code} ${JSON.stringify(e.message)}`);
    return e.message;
  }
  throw new Error(`tools/call ${name} was served (it must be refused with -32602): ${JSON.stringify(r).slice(0, 300)}`);
}

async function merged(kind) {
  const c = await connect(kind, base + (kind === "streamable" ? "/mcp" : "/sse"));
  const caps = c.client.getServerCapabilities() ?? {};
  for (const k of ["tools", "prompts", "resources"]) check(caps[k], `merged initialize lacks ${k}: ${JSON.stringify(caps)}`);
  const names = await allTools(c.client);
  const unprefixed = names.filter((n) => !n.includes(SEP) || !SERVERS.includes(n.split(SEP)[0]));
  check(unprefixed.length === 0, `merged tools without a server prefix: ${unprefixed}`);
  const per = {};
  for (const s of SERVERS) {
    per[s] = names.filter((n) => n.startsWith(s + SEP)).length;
    check(per[s] > 0, `no tool of ${s} in merged tools/list: ${names}`);
    const [tool, args, want] = CALLS[s];
    check(names.includes(s + SEP + tool), `${s}${SEP}${tool} not in merged tools/list`);
    await called(c.client, s + SEP + tool, args, want);
  }
  let msg;
  for (const h of HIDDEN) {
    check(!names.includes("fixture" + SEP + h), `fixture${SEP}${h} listed on the merged endpoint`);
    msg = await refused(c.client, "fixture" + SEP + h, h === "echo" ? { message: "must not reach the child" } : {});
  }
  await refused(c.client, "nosuch" + SEP + "tool");
  await close(c);
  return `merged ${kind}: ${names.length} tools (${SERVERS.map((s) => `${s}=${per[s]}`).join(" ")}), a call routed to each, filtered refused (${JSON.stringify(msg)})`;
}

async function fixture(kind) {
  const c = await connect(kind, `${base}/servers/fixture/${kind === "streamable" ? "mcp" : "sse"}`);
  const names = await allTools(c.client);
  check(names.includes("test_simple_text") && !names.some((n) => n.includes(SEP)), `fixture's own tools/list: ${names}`);
  await called(c.client, ...CALLS.fixture);
  for (const h of HIDDEN) {
    check(!names.includes(h), `${h} listed on /servers/fixture`);
    await refused(c.client, h, h === "echo" ? { message: "must not reach the child" } : {});
  }
  await close(c);
  return `fixture ${kind}: ${names.length} tools, a call, ${HIDDEN.length} filtered absent and refused`;
}

const run = which === "merged" ? merged : fixture;
const lines = [];
try {
  for (const kind of ["streamable", "sse"]) lines.push(await run(kind));
} catch (e) {
  console.error(e);
  console.log(`FAIL after [${lines.join("; ")}]: ${e.name}${e.code !== undefined ? ` ${e.code}` : ""}: ${e.message}`);
  process.exit(1);
}
clearTimeout(timer);
console.log(`ok ts ${lines.join("; ")}`);
