/**
 * Gateway targets, case for case as the Python SDK (both read target-cases.json,
 * tests/unit/test_client_target.py the same file), then calls of one client spreading over two
 * in-process ExplainServices on loopback. None of these needs a gateway.
 */

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import path from "node:path";
import { after, before, test } from "node:test";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { getProtoPath } from "google-proto-files";

import { createClient, parseTarget, ROUND_ROBIN_SERVICE_CONFIG, type PropscopeClient } from "../src";
import type { ProtoGrpcType } from "../src/generated/explain";
import { balancingOptions } from "../src/target";

// dist/test/ -> the package root.
const CASES = path.resolve(__dirname, "..", "..", "test", "target-cases.json");
const PROTO_DIR = path.resolve(__dirname, "..", "..", "..", "..", "protos");
const cases = JSON.parse(readFileSync(CASES, "utf-8")) as {
  valid: [string, { address: string; hosts: string[]; balanced: boolean }][];
  invalid: [string, string][];
};

test("targets read as the Python SDK reads them", () => {
  for (const [text, expected] of cases.valid) assert.deepEqual(parseTarget(text), expected, text);
});

test("targets that cannot be used are refused with the Python SDK's words", () => {
  for (const [text, words] of cases.invalid) {
    assert.throws(() => parseTarget(text), (error: Error) => {
      assert.ok(error.message.includes(words), `${text}: ${error.message}`);
      return true;
    });
  }
  assert.throws(() => createClient("gw-a:1,gw-b:1"), /dns:\/\/\/gw-a:1/);
});

test("only several gateways get round_robin", () => {
  assert.deepEqual(balancingOptions(parseTarget("localhost:50051")), {});
  assert.deepEqual(balancingOptions(parseTarget("10.0.0.1:1,10.0.0.2:1")), {
    "grpc.service_config": ROUND_ROBIN_SERVICE_CONFIG,
  });
  assert.deepEqual(JSON.parse(ROUND_ROBIN_SERVICE_CONFIG), {
    loadBalancingConfig: [{ round_robin: {} }],
  });
});

// Two ExplainServices answering ListModels with one model named after the server.
const servers: grpc.Server[] = [];
const addresses: string[] = [];
const calls = { a: 0, b: 0 };

before(async () => {
  const definition = protoLoader.loadSync("propscope/v1/explain.proto", {
    includeDirs: [PROTO_DIR, path.dirname(getProtoPath())],
  });
  const proto = grpc.loadPackageDefinition(definition) as unknown as ProtoGrpcType;
  for (const name of ["a", "b"] as const) {
    const server = new grpc.Server();
    server.addService(proto.propscope.v1.ExplainService.service, {
      ListModels: (_call: unknown, callback: grpc.sendUnaryData<unknown>) => {
        calls[name] += 1;
        callback(null, { models: [{ name }] });
      },
    });
    const port = await new Promise<number>((resolve, reject) =>
      server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (error, bound) =>
        error ? reject(error) : resolve(bound),
      ),
    );
    servers.push(server);
    addresses.push(`127.0.0.1:${port}`);
  }
});

after(() => {
  for (const server of servers) server.forceShutdown();
});

async function answeredBy(client: PropscopeClient): Promise<string> {
  return (await client.listModels({ deadline: Date.now() + 30_000 }))[0].name;
}

/** Calls until both gateways answered (round_robin picks among the ready ones), then `n` more. */
async function spread(client: PropscopeClient, n: number): Promise<Record<string, number>> {
  const first = new Set([await answeredBy(client)]);
  for (let i = 0; first.size < 2 && i < 1000; i++) first.add(await answeredBy(client));
  const counted: Record<string, number> = {};
  for (let i = 0; i < n; i++) {
    const name = await answeredBy(client);
    counted[name] = (counted[name] ?? 0) + 1;
  }
  return counted;
}

for (const form of ["list", "ipv4"]) {
  test(`calls of one client spread over the gateways (${form})`, async () => {
    const target = form === "list" ? addresses.join(",") : `ipv4:${addresses.join(",")}`;
    const client = createClient(target);
    try {
      const served = { ...calls };
      assert.deepEqual(await spread(client, 10), { a: 5, b: 5 });
      assert.ok(calls.a > served.a && calls.b > served.b, "each server saw the calls");
    } finally {
      client.close();
    }
  });
}

test("a caller's service config wins over round_robin", async () => {
  const pickFirst = JSON.stringify({ loadBalancingConfig: [{ pick_first: {} }] });
  const client = createClient(addresses.join(","), {
    channelOptions: { "grpc.service_config": pickFirst },
  });
  try {
    const names = new Set<string>();
    for (let i = 0; i < 10; i++) names.add(await answeredBy(client));
    assert.equal(names.size, 1);
  } finally {
    client.close();
  }
});

test("a single address answers as before", async () => {
  const client = createClient(addresses[1]);
  try {
    assert.equal(await answeredBy(client), "b");
  } finally {
    client.close();
  }
});

test("a gateway down leaves the calls to the other", async () => {
  const down = servers[1];
  await new Promise<void>((resolve) => down.tryShutdown(() => resolve()));
  const client = createClient(addresses.join(","));
  try {
    for (let i = 0; i < 10; i++) assert.equal(await answeredBy(client), "a");
  } finally {
    client.close();
  }
});
