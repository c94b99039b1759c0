// Drives Forge's demo chain with the official MCP TypeScript SDK client, default options (a 60 s request
// timeout that progress does not reset): demo assets -> train -> merge -> quantize -> Modelfile -> query ->
// seal -> verify, over stdio or streamable HTTP. Checks what an agent relies on:
//   - every result validates against the tool's outputSchema (the SDK client does this itself),
//   - within each forge_job_wait call, progress notifications strictly increase,
//   - every tool error is one JSON object {code, message, hint, retryable, details}.
// Prints one JSON summary line; exits 1 on the first broken promise.
//
// usage: node drive_chain.cjs stdio <python> <FORGE_HOME>
//        node drive_chain.cjs http <url>
const { createRequire } = require("node:module");
const path = require("node:path");

// TSCLIENT_DIR holds either SDK: @modelcontextprotocol/sdk 1.x (protocol 2025-11-25) or its successor
// @modelcontextprotocol/client 2.x, pinned here to protocol 2026-07-28.
const sdkRoot = process.env.TSCLIENT_DIR;
const sdk = createRequire(path.join(sdkRoot, "package.json"));
const modern = (() => { try { sdk.resolve("@modelcontextprotocol/client"); return true; } catch { return false; } })();
const { Client, StreamableHTTPClientTransport } = modern
  ? sdk("@modelcontextprotocol/client")
  : { ...sdk("@modelcontextprotocol/sdk/client/index.js"), ...sdk("@modelcontextprotocol/sdk/client/streamableHttp.js") };
const { StdioClientTransport } = modern
  ? sdk("@modelcontextprotocol/client/stdio") : sdk("@modelcontextprotocol/sdk/client/stdio.js");

function newClient() {
  const info = { name: "forge-ts-check", version: "1.0.0" };
  return modern ? new Client(info, { versionNegotiation: { mode: { pin: "2026-07-28" } } }) : new Client(info);
}

function callTool(client, params, options) { // 1.x takes a result schema second; 2.x the options
  return modern ? client.callTool(params, options) : client.callTool(params, undefined, options);
}

const ERROR_KEYS = ["code", "details", "hint", "message", "retryable"];
const summary = { calls: 0, waits: 0, notifications: 0, errors_checked: 0 };

function fail(message) {
  console.log(JSON.stringify({ ok: false, failure: message, ...summary }));
  process.exit(1);
}

async function call(client, name, args) {
  summary.calls += 1;
  const result = await callTool(client, { name, arguments: args }); // validates structuredContent itself
  if (result.isError) fail(`${name} failed: ${result.content[0].text}`);
  if (!result.structuredContent) fail(`${name} returned no structured content`);
  return result.structuredContent;
}

async function follow(client, handle) {
  for (;;) {
    summary.waits += 1;
    const seen = [];
    const status = await callTool(
      client,
      { name: "forge_job_wait", arguments: { job_id: handle.job_id } },
      { onprogress: (p) => seen.push(p.progress) },
    );
    if (status.isError) fail(`forge_job_wait failed: ${status.content[0].text}`);
    summary.notifications += seen.length;
    for (let i = 1; i < seen.length; i += 1) {
      if (!(seen[i] > seen[i - 1])) fail(`progress went ${seen[i - 1]} -> ${seen[i]} in one request`);
    }
    const s = status.structuredContent;
    if (["succeeded", "failed", "cancelled"].includes(s.status)) {
      if (s.status !== "succeeded") fail(`job ${s.job_id} ${s.status}: ${JSON.stringify(s.error)}`);
      return s;
    }
  }
}

async function checkError(client, name, args, code) {
  const result = await callTool(client, { name, arguments: args });
  if (!result.isError) fail(`${name} with bad arguments succeeded`);
  if (result.content.length !== 1) fail(`${name} error has ${result.content.length} content items`);
  let error;
  try {
    error = JSON.parse(result.content[0].text);
  } catch (e) {
    fail(`${name} error is not JSON: ${result.content[0].text}`);
  }
  if (JSON.stringify(Object.keys(error).sort()) !== JSON.stringify(ERROR_KEYS)) fail(`error keys ${Object.keys(error)}`);
  if (error.code !== code) fail(`${name}: expected ${code}, got ${error.code}`);
  summary.errors_checked += 1;
}

async function main() {
  const [mode, target, home] = process.argv.slice(2);
  const transport = mode === "stdio"
    ? new StdioClientTransport({
      command: target, args: ["-m", "mcp_servers.forge.server"],
      env: { ...process.env, FORGE_HOME: home }, stderr: "ignore",
    })
    : new StreamableHTTPClientTransport(new URL(target));
  const client = newClient();
  await client.connect(transport);
  const tools = (await client.listTools()).tools; // caches each tool's output validator
  summary.tools = tools.length;
  summary.protocol = modern ? client.getNegotiatedProtocolVersion() : client.transport?.protocolVersion ?? null;

  await checkError(client, "forge_job_status", { job_id: "train-20000101-000000-000000" }, "job_not_found");
  await checkError(client, "forge_train", { base_model: "x", dataset: "y", epochs: 3 }, "invalid_argument");
  await checkError(client, "forge_job_list", { limit: 0 }, "invalid_argument");

  const assets = await call(client, "forge_demo_assets", {});
  const train = await follow(client, await call(client, "forge_train", {
    base_model: assets.model_dir, dataset: assets.dataset,
    hyperparameters: { max_steps: 40, learning_rate: 0.002, save_steps: 20 },
  }));
  const merge = await follow(client, await call(client, "forge_merge", { adapter: train.job_id }));
  const quant = await follow(client, await call(client, "forge_quantize", { model: merge.job_id }));
  const modelfile = await call(client, "forge_modelfile", { gguf: quant.job_id });
  const reply = await call(client, "forge_query_model", { model: quant.job_id, prompt: "What is LoRA?", max_tokens: 8 });
  const seal = await call(client, "forge_seal_snapshot", { note: "TypeScript SDK client" });
  const verified = await call(client, "forge_seal_verify", { seal_id: seal.seal_id });
  if (!verified.ok) fail(`seal verify: ${JSON.stringify(verified.mismatches)}`);
  await client.close();
  console.log(JSON.stringify({
    ok: true, ...summary, train_steps: train.progress.step, artifacts: quant.artifacts.length,
    template: modelfile.template_family, reply_tokens: reply.completion_tokens, seal: seal.seal_id,
    chain: verified.chain_length,
  }));
}

main().catch((e) => fail(String(e && e.stack ? e.stack : e)));
