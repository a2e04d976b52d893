// Official TypeScript SDK 2.x client (npm @modelcontextprotocol/client) pinned to protocol
// revision 2026-07-28 (stateless: server/discover at connect, per-request _meta envelope, no
// initialize, no session) against a running stdio-sse.
// usage: node ts_modern_client.mjs URL [TOOL JSON_ARGS EXPECTED_SUBSTRING]
//   default: echo '{"message":"hi from ts modern"}' "hi from ts modern"
// Connects (the pin fails loudly unless server/discover offers 2026-07-28), lists tools, calls
// TOOL and checks that its text contains EXPECTED_SUBSTRING. Prints one line, exits 0 on success.
import { Client, StreamableHTTPClientTransport } from "@modelcontextprotocol/client";

const MODERN = "2026-07-28";
const [url, tool = "echo", args = '{"message":"hi from ts modern"}', expected = "hi from ts modern"] = process.argv.slice(2);
const timer = setTimeout(() => { console.error("timed out"); process.exit(1); }, 60000);
try {
    const client = new Client(
        { name: "stdio-sse-ts-modern-check", version: "1.0.0" },
        { versionNegotiation: { mode: { pin: MODERN } } },
    );
    const transport = new StreamableHTTPClientTransport(new URL(url));
    await client.connect(transport);
    const version = client.getNegotiatedProtocolVersion();
    if (version !== MODERN) throw new Error(`negotiated protocol version ${version}, want ${MODERN}`);
    const { tools } = await client.listTools();
    const names = tools.map((t) => t.name);
    if (!names.includes(tool)) throw new Error(`${tool} not in tools/list: ${names}`);
    const result = await client.callTool({ name: tool, arguments: JSON.parse(args) });
    const text = result.content.map((c) => c.text ?? "").join(" ");
    if (result.isError) throw new Error(`isError result: ${JSON.stringify(text)}`);
    if (!text.includes(expected)) throw new Error(`expected ${JSON.stringify(expected)} in ${JSON.stringify(text)}`);
    if (transport.sessionId) throw new Error(`a 2026-07-28 exchange was given a session id: ${transport.sessionId}`);
    await client.close();
    clearTimeout(timer);
    console.log(`ok ts modern version=${version} tools=${names.length} result=${JSON.stringify(text.slice(0, 60))}`);
} catch (e) {
    console.error(`FAIL: ${e?.stack ?? e}`);
    process.exit(1);
}
