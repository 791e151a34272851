/**
 * graph() against an in-process fake CausalGraphService (pure client logic: the request built
 * from the options, the stream gathered into one result, errors); the real gateway's answers
 * are checked by the integration tests.
 */

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import * as grpc from "@grpc/grpc-js";

import { buildGraphRequest, PropscopeError, type PropscopeClient } from "../src";
import type { ProtoGrpcType } from "../src/generated/graph";
import type { BuildGraphEvent } from "../src/generated/propscope/v1/BuildGraphEvent";
import type { BuildGraphRequest__Output } from "../src/generated/propscope/v1/BuildGraphRequest";

import { type FakeService, serveFake } from "./fake-service";

// PNG's signature: sent as it is, never decoded (by the client or the fake).
const IMAGE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 1, 2, 3]);

const received: BuildGraphRequest__Output[] = [];
let fake: FakeService;
let client: PropscopeClient;

function buildGraph(call: grpc.ServerWritableStream<BuildGraphRequest__Output, BuildGraphEvent>) {
  const request = call.request;
  received.push(request);
  if (request.model?.name === "blackbox") {
    call.emit("error", { code: grpc.status.FAILED_PRECONDITION, details: "needs interventions" });
    return;
  }
  const requestId = request.requestId || "server-made";
  const images = request.images.length;
  call.write({
    requestId,
    accepted: {
      model: request.model?.name,
      modelVersion: "1",
      layers: [{ name: "features.1", channels: 32 }],
      steps: request.steps || 10,
      images,
      targets: Array(images).fill(1),
      baselineSource: "config",
      plannedPasses: 40,
    },
  });
  call.write({ requestId, progress: { passesDone: 20, passesTotal: 40 } });
  for (let image = 0; image < images; image++) {
    call.write({
      requestId,
      node: {
        image,
        layer: "features.1",
        channel: 3,
        score: 0.2,
        significant: true,
        curve: [1, 0.5],
      },
    });
    call.write({
      requestId,
      edge: {
        image,
        sourceLayer: "features.1",
        sourceChannel: 3,
        targetLayer: "features.2",
        targetChannel: 9,
        pathEffect: 0.25,
        significant: true,
      },
    });
  }
  if (images > 1) {
    call.write({ requestId, taskGraph: { targetClass: 1, images: [0, 1], minShare: 0.5 } });
  }
  if (request.repairProperty) {
    call.write({
      requestId,
      repair: {
        property: request.repairProperty.name,
        channels: [{ layer: "features.1", channel: 3, value: 0.125 }],
      },
    });
  }
  call.write({
    requestId,
    done: {
      totalMs: 12.5,
      passes: 38,
      warnings: ["image 0: the target probability is 1 - 8.6e-12"],
    },
  });
  call.end();
}

before(async () => {
  fake = await serveFake<ProtoGrpcType>(
    "propscope/v1/graph.proto",
    (proto) => proto.propscope.v1.CausalGraphService,
    { BuildGraph: buildGraph },
  );
  client = fake.client;
});

after(() => fake.close());

test("graph sends the options and gathers nodes, edges, task graph and repair", async () => {
  const progress: number[] = [];
  const items: string[] = [];
  const result = await client.graph(
    {
      images: [IMAGE, IMAGE],
      model: "synth_hue",
      layers: ["features.1", "features.2"],
      steps: 4,
      baseline: "zero",
      minShare: 0.5,
      repairProperty: "hue=procedural:operation=hue",
    },
    {
      onProgress: (update) => progress.push(update.passesDone),
      onItem: (item) => items.push("node" in item ? "node" : "edge"),
    },
  );
  const request = received.at(-1)!;
  assert.deepEqual(request.layers, ["features.1", "features.2"]);
  assert.equal(request.baseline, "GRAPH_BASELINE_ZERO");
  assert.equal(request.steps, 4);
  assert.equal(request.images.length, 2);
  assert.equal(request.minShare, 0.5);
  assert.deepEqual(request.repairProperty?.editor?.parameters, { operation: "hue" });
  assert.equal(result.requestId, "server-made");
  assert.equal(result.accepted.layers[0].channels, 32);
  assert.equal(result.nodes.length, 2);
  assert.equal(result.edges[1].pathEffect, 0.25);
  assert.equal(result.taskGraph?.targetClass, 1);
  assert.deepEqual(result.repair?.channels.map((c) => c.value), [0.125]);
  assert.equal(result.done.passes, 38);
  assert.deepEqual(result.warnings, ["image 0: the target probability is 1 - 8.6e-12"]);
  assert.deepEqual(progress, [20]);
  assert.deepEqual(items, ["node", "edge", "node", "edge"]);
});

test("bad graph options are refused before anything is sent", async () => {
  const before = received.length;
  const refused = (options: object, message: RegExp) =>
    assert.rejects(buildGraphRequest({ images: IMAGE, model: "m", ...options }), message);
  await refused({ baseline: "median" }, /baseline must be one of mean, zero/);
  await refused({ minShare: 0 }, /minShare must be in \(0, 1\]/);
  await refused({ repairMaxShare: 0.9 }, /repairMaxShare must be in \(0, 0.5\]/);
  await assert.rejects(buildGraphRequest({ images: [], model: "m" }), /at least one image/);
  assert.equal(received.length, before);
});

test("a black-box model is a PropscopeError FAILED_PRECONDITION", async () => {
  await assert.rejects(client.graph({ images: IMAGE, model: "blackbox" }), (error: unknown) => {
    assert.ok(error instanceof PropscopeError);
    assert.equal(error.codeName, "FAILED_PRECONDITION");
    return true;
  });
});
