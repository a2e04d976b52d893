// Official TypeScript SDK client (npm @modelcontextprotocol/sdk) against a running stdio-sse.
// usage: node ts_client.mjs URL TOOL JSON_ARGS EXPECTED_SUBSTRING
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [url, tool, args, expected] = process.argv.slice(2);
const timer = setTimeout(() => { console.error("timed out"); process.exit(1); }, 60000);
const client = new Client({ name: "stdio-sse-ts-check", version: "1.0.0" });
const transport = new StreamableHTTPClientTransport(new URL(url));
await client.connect(transport);
const { tools } = await client.listTools();
const names = tools.map((t) => t.name);
if (!names.includes(tool)) throw new Error(`${tool} not in tools/list: ${names}`);
const result = await client.callTool({ name: tool, arguments: JSON.parse(args) });
const text = result.content.map((c) => c.text ?? "").join(" ");
if (!text.includes(expected)) throw new Error(`expected ${JSON.stringify(expected)} in ${JSON.stringify(text)}`);
await transport.terminateSession();
await client.close();
clearTimeout(timer);
console.log(`ok ts version=${transport.protocolVersion} tools=${names.length} result=${JSON.stringify(text.slice(0, 60))}`);
