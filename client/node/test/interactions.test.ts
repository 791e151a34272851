/**
 * interactions() and interactionDesign() against an in-process fake InteractionService (pure
 * client logic: the request built from the options, the stream gathered into one result,
 * refusals before anything is sent); the real gateway's answers are checked by the integration
 * tests.
 */

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import * as grpc from "@grpc/grpc-js";

import {
  buildInteractionDesignRequest,
  buildInteractionsRequest,
  type PropscopeClient,
} from "../src";
import type { ProtoGrpcType } from "../src/generated/interactions";
import type { InteractionDesignRequest__Output } from "../src/generated/propscope/v1/InteractionDesignRequest";
import type { InteractionsEvent } from "../src/generated/propscope/v1/InteractionsEvent";
import type { InteractionsRequest__Output } from "../src/generated/propscope/v1/InteractionsRequest";

import { type FakeService, serveFake } from "./fake-service";

// PNG's signature: sent as it is, never decoded (by the client or the fake).
const IMAGE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 1, 2, 3]);

const received: InteractionsRequest__Output[] = [];
let fake: FakeService;
let client: PropscopeClient;

function estimate(value: number) {
  return { value, ciLow: value - 0.1, ciHigh: value + 0.1 };
}

function interactions(
  call: grpc.ServerWritableStream<InteractionsRequest__Output, InteractionsEvent>,
) {
  const request = call.request;
  received.push(request);
  const names = request.properties.map((p) => p.name);
  const requestId = request.requestId || "server-made";
  call.write({
    requestId,
    accepted: { modelVersion: "1", compositionOrder: names, designSize: 8, warnings: ["w"] },
  });
  call.write({ requestId, progress: { stage: "edit", completed: 4, total: 32 } });
  call.write({
    requestId,
    result: {
      indices: names.map((name) => ({
        propertyName: name,
        firstOrder: estimate(0.3),
        totalOrder: estimate(0.6),
        interaction: estimate(0.3),
      })),
      interactionShare: estimate(0.6),
      interactionSignificant: true,
      compositionOrder: names,
      warnings: ["w", "x"],
    },
  });
  call.end();
}

function interactionDesign(
  call: grpc.ServerUnaryCall<InteractionDesignRequest__Output, unknown>,
  callback: grpc.sendUnaryData<unknown>,
) {
  const rows = Array.from({ length: call.request.designSize * 4 }, (_, r) => ({
    strengths: [r / 100, 0.5],
  }));
  callback(null, { rows, rowKinds: rows.map(() => "A") });
}

before(async () => {
  fake = await serveFake<ProtoGrpcType>(
    "propscope/v1/interactions.proto",
    (proto) => proto.propscope.v1.InteractionService,
    {
    Interactions: interactions,
    InteractionDesign: interactionDesign,
  },
  );
  client = fake.client;
});

after(() => fake.close());

test("interactions sends the properties in order and gathers the result", async () => {
  const stages: string[] = [];
  const result = await client.interactions(
    {
      image: IMAGE,
      model: "synth_conjunction",
      properties: ["hue=procedural:operation=hue", "patch=procedural:operation=blend"],
      designSize: 8,
      pair: ["patch", "hue"],
      targetScore: "logit",
      seed: 3,
    },
    { onProgress: (update) => stages.push(update.stage) },
  );
  const request = received.at(-1)!;
  assert.deepEqual(
    request.properties.map((p) => p.name),
    ["hue", "patch"],
  );
  assert.deepEqual(request.properties[1].editor?.parameters, { operation: "blend" });
  assert.deepEqual(request.secondOrderPair, ["patch", "hue"]);
  assert.equal(request.designSize, 8);
  assert.equal(request.targetScore, "TARGET_SCORE_LOGIT");
  assert.equal(request.seed, "3");
  assert.equal(request.providedDesign, null);
  assert.equal(result.requestId, "server-made");
  assert.deepEqual(result.accepted.compositionOrder, ["hue", "patch"]);
  assert.equal(result.result.indices[1].totalOrder?.ciHigh, 0.7);
  assert.equal(result.result.interactionSignificant, true);
  assert.deepEqual(result.warnings, ["w", "x"]);
  assert.deepEqual(stages, ["edit"]);
});

test("own edits: the design's rows, then the images as a provided design", async () => {
  const design = await client.interactionDesign({ properties: 2, designSize: 4, seed: 1 });
  assert.equal(design.rows.length, 16);
  assert.equal(design.rows[3][0], Math.fround(0.03)); // float32 on the wire
  await client.interactions({
    image: IMAGE,
    model: "m",
    properties: ["red", "green"],
    providedDesign: design.rows.map(() => IMAGE),
  });
  const request = received.at(-1)!;
  assert.deepEqual(
    request.properties.map((p) => [p.name, p.editor ?? null]),
    [
      ["red", null],
      ["green", null],
    ],
  );
  assert.equal(request.providedDesign?.images.length, 16);
});

test("bad interactions options are refused before anything is sent", async () => {
  const before = received.length;
  const refused = (options: object, message: RegExp) =>
    assert.rejects(
      buildInteractionsRequest({
        image: IMAGE,
        model: "m",
        properties: ["a=procedural", "b=procedural"],
        ...options,
      }),
      message,
    );
  await refused({ properties: ["a=procedural"] }, /at least two properties, got 1/);
  await refused({ designSize: 24 }, /power of two .* the nearest: 16 or 32/);
  await refused({ pair: ["a", "c"] }, /pair must be two different property names of a, b/);
  await refused({ properties: ["a=procedural", "a=procedural"] }, /'a' is given twice/);
  await refused({ confidence: 1 }, /confidence must be in \(0, 1\)/);
  assert.throws(() => buildInteractionDesignRequest({ properties: 1 }), /integer >= 2/);
  assert.throws(
    () => buildInteractionDesignRequest({ properties: 2, pair: [0, 2] }),
    /two different indices in 0..1/,
  );
  assert.equal(received.length, before);
});
