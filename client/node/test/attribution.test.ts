/**
 * attribute and evaluateAttribution against an in-process fake AttributionService (pure client
 * logic: request building, maps as rows, errors); the real gateway's answers are checked by the
 * integration tests.
 */

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import * as grpc from "@grpc/grpc-js";
import { getProtoPath, loadSync } from "google-proto-files";

import {
  buildAttributeRequest,
  buildEvaluateAttributionRequest,
  PropscopeError,
  type AttributeOptions,
  type AttributeProgress,
  type PropscopeClient,
} from "../src";
import type { ProtoGrpcType } from "../src/generated/attribution";
import type { AttributeEvent } from "../src/generated/propscope/v1/AttributeEvent";
import type { AttributeRequest__Output } from "../src/generated/propscope/v1/AttributeRequest";
import type { EvaluateAttributionEvent } from "../src/generated/propscope/v1/EvaluateAttributionEvent";
import type { EvaluateAttributionRequest__Output } from "../src/generated/propscope/v1/EvaluateAttributionRequest";

import { type FakeService, serveFake } from "./fake-service";

const HEIGHT = 2;
const WIDTH = 3;
/** Row r, column c holds r + c / 100: swapped rows and columns cannot pass. */
const MAP = [
  [0, 0.01, 0.02],
  [1, 1.01, 1.02],
];
// PNG's signature: sent as it is, never decoded (by the client or the fake).
const IMAGE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 1, 2, 3]);

const received: { attribute: AttributeRequest__Output[]; evaluate: EvaluateAttributionRequest__Output[] } =
  { attribute: [], evaluate: [] };

/** The trailer of a refusal naming `field`, as the gateway sends it. */
function badRequestMetadata(field: string, description: string): grpc.Metadata {
  const root = loadSync(getProtoPath("rpc", "error_details.proto"), { keepCase: true });
  root.loadSync(getProtoPath("rpc", "status.proto"), { keepCase: true });
  const badRequest = root.lookupType("google.rpc.BadRequest");
  const status = root.lookupType("google.rpc.Status");
  const detail = badRequest.encode({ field_violations: [{ field, description }] }).finish();
  const bytes = status
    .encode({
      code: grpc.status.INVALID_ARGUMENT,
      message: `${field} is wrong`,
      details: [{ type_url: "type.googleapis.com/google.rpc.BadRequest", value: detail }],
    })
    .finish();
  const metadata = new grpc.Metadata();
  metadata.set("grpc-status-details-bin", Buffer.from(bytes));
  return metadata;
}

function attribute(call: grpc.ServerWritableStream<AttributeRequest__Output, AttributeEvent>) {
  const request = call.request;
  received.attribute.push(request);
  if (request.model?.name === "refused") {
    call.emit("error", {
      code: grpc.status.INVALID_ARGUMENT,
      details: "sobol.nb_design is wrong",
      metadata: badRequestMetadata("sobol.nb_design", "use a power of two"),
    });
    return;
  }
  if (request.method === "eva") {
    evaAnswer(call);
    return;
  }
  const rise = request.method === "rise";
  const grid = (rise ? request.rise?.gridSize : request.sobol?.gridSize) || 2;
  const passes = rise ? 100 : 32 * (grid * grid + 2);
  call.write({
    requestId: request.requestId || "server-made",
    accepted: {
      method: rise ? "rise" : "sobol",
      modelVersion: "1",
      plannedForwardPasses: passes,
      sobol: rise ? null : { gridSize: grid, nbDesign: 32, estimator: "SOBOL_ESTIMATOR_JANSEN" },
      perturbationDescription: "inpainting toward black",
      targetLabel: "circle",
    },
  });
  call.write({ progress: { forwardPassesDone: passes / 2, forwardPassesTotal: passes } });
  call.write({ progress: { forwardPassesDone: passes, forwardPassesTotal: passes } });
  if (request.model?.name === "no-result") {
    call.end();
    return;
  }
  call.write({
    result: {
      map: { height: HEIGHT, width: WIDTH, values: MAP.flat() },
      grid: { height: grid, width: grid, values: Array.from({ length: grid * grid }, (_, i) => i) },
      channelGrid: request.sobol?.perChannel
        ? Array.from({ length: grid * grid * 3 }, (_, i) => i)
        : [],
      forwardPasses: passes,
      originalScore: 0.75,
      targetClass: 0,
      targetScore: "TARGET_SCORE_PROBABILITY",
      totalMs: 5,
    },
  });
  call.end();
}

/** An EVA map: a hybrid is not guaranteed; "eva-malformed" sends too few region bounds. */
function evaAnswer(call: grpc.ServerWritableStream<AttributeRequest__Output, AttributeEvent>) {
  const { eva, model } = call.request;
  const grid = eva?.gridSize || 2;
  call.write({
    accepted: {
      method: "eva",
      plannedForwardPasses: grid * grid + 1,
      eva: { ...eva, gridSize: grid, bound: "BOUND_METHOD_CROWN", samples: eva?.samples || 256 },
    },
  });
  const cells = model?.name === "eva-malformed" ? grid * grid - 1 : grid * grid;
  call.write({
    result: {
      map: { height: HEIGHT, width: WIDTH, values: MAP.flat() },
      grid: { height: grid, width: grid, values: Array.from({ length: grid * grid }, (_, i) => i) },
      forwardPasses: grid * grid + 1,
      targetScore: "TARGET_SCORE_LOGIT",
      eva: {
        guaranteed: !eva?.hybridLayer,
        bound: "BOUND_METHOD_CROWN",
        epsilon: 8 / 255,
        epsilonInput: [0.1, 0.2, 0.3],
        hybridLayer: eva?.hybridLayer ?? "",
        overlapBound: -1.5,
        adversaryClass: 2,
        adversaryLabel: "square",
        sampledOverlap: -3.25,
        samples: 256,
        regionBounds: Array.from({ length: cells }, (_, i) => -2 - i),
        certified: true,
        boundPasses: grid * grid + 1,
        samplePasses: "12345678901",
        // The server decides: a hybrid bound below 0 proves nothing.
        decision: eva?.hybridLayer ? "EVA_DECISION_UNDECIDED" : "EVA_DECISION_CERTIFIED",
        verdict: eva?.hybridLayer ? "undecided: the hybrid bound" : "certified: no input",
      },
    },
  });
  call.end();
}

function evaluate(
  call: grpc.ServerWritableStream<EvaluateAttributionRequest__Output, EvaluateAttributionEvent>,
) {
  const request = call.request;
  received.evaluate.push(request);
  const metrics = (["deletion", "insertion", "muFidelity", "stability"] as const)
    .filter((key) => request[key])
    .map((key) => (key === "muFidelity" ? "mu_fidelity" : key));
  call.write({ accepted: { metrics, plannedForwardPasses: 10 } });
  const values = request.explanation?.values ?? [];
  const firstRow = values.slice(0, request.explanation?.width ?? 0).reduce((a, b) => a + b, 0);
  for (const metric of metrics) {
    if (request.model?.name === "missing-metric" && metric === "insertion") continue;
    call.write({
      metric: {
        metric,
        value: metric === "mu_fidelity" ? firstRow : 0.25,
        fractions: [0, 1],
        scores: [0.9, 0.1],
        settings: `${metric} settings`,
      },
    });
  }
  call.end();
}

let fake: FakeService;
let client: PropscopeClient;

before(async () => {
  fake = await serveFake<ProtoGrpcType>(
    "propscope/v1/attribution.proto",
    (proto) => proto.propscope.v1.AttributionService,
    {
    Attribute: attribute,
    EvaluateAttribution: evaluate,
  },
  );
  client = fake.client;
});

after(() => fake.close());

test("attribute sends the options and returns the map as row-major float32", async () => {
  const progress: AttributeProgress[] = [];
  const found = await client.attribute(
    {
      image: IMAGE,
      model: "m",
      gridSize: 4,
      nbDesign: 16,
      estimator: "homma",
      scrambled: true,
      seed: 5,
      targetClass: 3,
    },
    { onProgress: (update) => progress.push(update) },
  );
  const request = received.attribute.at(-1)!;
  assert.equal(request.method, "sobol");
  assert.equal(request.sobol?.gridSize, 4);
  assert.equal(request.sobol?.nbDesign, 16);
  assert.equal(request.sobol?.estimator, "SOBOL_ESTIMATOR_HOMMA");
  assert.equal(request.sobol?.scrambled, true);
  assert.equal(request.seed, "5");
  assert.equal(request.model?.targetClass, 3);

  assert.equal(found.method, "sobol");
  assert.deepEqual([found.map.height, found.map.width], [HEIGHT, WIDTH]);
  assert.ok(found.map.values instanceof Float32Array);
  // values[row * width + col]
  assert.equal(found.map.values[1 * WIDTH + 2], Math.fround(1.02));
  assert.equal(found.grid.values.length, 16);
  assert.equal(found.channelGrid, null);
  assert.equal(found.forwardPasses, 32 * 18);
  assert.equal(found.targetLabel, "circle");
  assert.equal(found.accepted.perturbationDescription, "inpainting toward black");
  assert.deepEqual(
    progress.map((p) => [p.forwardPassesDone, p.forwardPassesTotal]),
    [
      [288, 576],
      [576, 576],
    ],
  );
});

test("attribute with RISE, and per-channel Sobol's channel grid", async () => {
  const rise = await client.attribute({
    image: IMAGE,
    model: "m",
    method: "rise",
    nbSamples: 100,
    preservationProbability: 0.25,
  });
  const request = received.attribute.at(-1)!;
  assert.equal(request.method, "rise");
  assert.equal(request.rise?.nbSamples, 100);
  assert.equal(request.rise?.preservationProbability, 0.25);
  assert.equal(rise.method, "rise");
  const perChannel = await client.attribute({ image: IMAGE, model: "m", perChannel: true });
  assert.equal(perChannel.channelGrid?.length, 2 * 2 * 3);
});

test("bad options are refused before anything is sent", async () => {
  const base = { image: IMAGE, model: "m" };
  await assert.rejects(buildAttributeRequest({ ...base, nbDesign: 24 }), /power of two/);
  await assert.rejects(buildAttributeRequest({ ...base, method: "rise", nbDesign: 8 }), /Sobol options/);
  await assert.rejects(
    buildAttributeRequest({ ...base, method: "rise", scrambled: true }),
    /Sobol options/,
  );
  await assert.rejects(
    buildAttributeRequest({ ...base, baseline: "grey" as never }),
    /baseline must be one of/,
  );
  await assert.rejects(
    buildAttributeRequest({ ...base, method: "rise", preservationProbability: 1 }),
    /preservationProbability must be in \(0, 1\)/,
  );
  await assert.rejects(buildEvaluateAttributionRequest(base), /explanation .* is required/);
  await assert.rejects(
    buildEvaluateAttributionRequest({ ...base, explanation: [[1, 2], [3]] }),
    /rows of equal length/,
  );
  await assert.rejects(
    buildEvaluateAttributionRequest({ ...base, explanation: [[1, NaN]] }),
    /NaN or infinite/,
  );
  await assert.doesNotReject(buildEvaluateAttributionRequest({ ...base, metrics: ["stability"] }));
});

test("attribute with EVA sends its options and returns its bounds", async () => {
  const found = await client.attribute({
    image: IMAGE,
    model: "m",
    method: "eva",
    gridSize: 3,
    epsilon: 0.02,
    bound: "ibp",
    samples: 64,
  });
  const request = received.attribute.at(-1)!;
  assert.equal(request.method, "eva");
  assert.equal(request.eva?.gridSize, 3);
  assert.ok(Math.abs((request.eva?.epsilon ?? 0) - 0.02) < 1e-7);
  assert.equal(request.eva?.bound, "BOUND_METHOD_IBP");
  assert.equal(request.eva?.samples, 64);
  assert.equal(found.method, "eva");
  const eva = found.eva!;
  assert.equal(eva.guarantee, "verified (guaranteed)");
  assert.deepEqual([eva.overlapBound, eva.sampledOverlap, eva.certified], [-1.5, -3.25, true]);
  assert.equal(eva.decision, "certified");
  assert.equal(eva.verdict, "certified: no input");
  assert.deepEqual([eva.adversaryClass, eva.adversaryLabel], [2, "square"]);
  assert.ok(eva.regionBounds instanceof Float64Array);
  assert.deepEqual(Array.from(eva.regionBounds), [-2, -3, -4, -5, -6, -7, -8, -9, -10]);
  assert.equal(eva.samplePasses, "12345678901");

  const hybrid = await client.attribute({
    image: IMAGE,
    model: "m",
    method: "eva",
    hybridLayer: "features.3",
  });
  assert.equal(received.attribute.at(-1)!.eva?.bound, "BOUND_METHOD_UNSPECIFIED");
  assert.equal(received.attribute.at(-1)!.eva?.epsilon, undefined);
  assert.equal(hybrid.eva?.guaranteed, false);
  assert.equal(hybrid.eva?.guarantee, "hybrid from features.3: NOT guaranteed");
  assert.equal(hybrid.eva?.decision, "undecided"); // a hybrid bound below 0 proves nothing
  const sobol = await client.attribute({ image: IMAGE, model: "m" });
  assert.equal(sobol.eva, null);
  await assert.rejects(
    client.attribute({ image: IMAGE, model: "eva-malformed", method: "eva" }),
    /regionBounds: 3 values for 4 cells/,
  );
});

test("bad EVA options are refused before anything is sent", async () => {
  const eva = { image: IMAGE, model: "m", method: "eva" as const };
  const refusals: [Partial<AttributeOptions>, RegExp][] = [
    [{ epsilon: 0 }, /epsilon must be in \(0, 1\]/],
    [{ epsilon: 2 }, /epsilon must be in/],
    [{ epsilon: NaN }, /epsilon must be in/],
    [{ bound: "zono" as never }, /bound must be one of/],
    [{ gridSize: 40 }, /gridSize must be in 2..32/],
    [{ samples: 70000 }, /samples must be in/],
    [{ samples: -1 }, /samples must be an integer/],
    [{ nbDesign: 32 }, /Sobol options/],
    [{ nbSamples: 10 }, /RISE options/],
    [{ targetScore: "probability" }, /targetScore must be logit/],
    [{ baseline: "black" }, /leave them out/],
  ];
  for (const [options, message] of refusals) {
    await assert.rejects(buildAttributeRequest({ ...eva, ...options }), message);
  }
  await assert.rejects(
    buildAttributeRequest({ image: IMAGE, model: "m", epsilon: 0.1 }),
    /are EVA options/,
  );
  await assert.rejects(
    buildAttributeRequest({ image: IMAGE, model: "m", method: "rise", samples: 5 }),
    /are EVA options/,
  );
});

test("a refusal is a PropscopeError with the field to fix", async () => {
  await assert.rejects(client.attribute({ image: IMAGE, model: "refused" }), (error: unknown) => {
    assert.ok(error instanceof PropscopeError, String(error));
    assert.equal(error.codeName, "INVALID_ARGUMENT");
    assert.deepEqual(error.fieldViolations, [
      { field: "sobol.nb_design", description: "use a power of two" },
    ]);
    return true;
  });
  await assert.rejects(
    client.attribute({ image: IMAGE, model: "no-result" }),
    (error: unknown) => error instanceof PropscopeError && error.codeName === "INTERNAL",
  );
});

test("evaluateAttribution sends the map row-major and returns each metric", async () => {
  const seen: string[] = [];
  const found = await client.evaluateAttribution(
    { image: IMAGE, model: "m", explanation: MAP, steps: 5, maxPercentagePerturbed: 0.5 },
    { onMetric: (metric) => seen.push(metric.metric) },
  );
  const request = received.evaluate.at(-1)!;
  assert.deepEqual([request.explanation?.height, request.explanation?.width], [HEIGHT, WIDTH]);
  assert.equal(request.deletion?.steps, 5);
  assert.equal(request.insertion?.maxPercentagePerturbed, 0.5);
  assert.equal(request.stability, null);
  assert.deepEqual(found.accepted.metrics, ["deletion", "insertion", "mu_fidelity"]);
  assert.deepEqual(seen, found.accepted.metrics);
  // The fake sums the first row it received.
  const muFidelity = found.results.find((r) => r.metric === "mu_fidelity")!;
  assert.ok(Math.abs(muFidelity.value - 0.03) < 1e-6, String(muFidelity.value));

  const attribution = await client.attribute({ image: IMAGE, model: "m" });
  await client.evaluateAttribution({ image: IMAGE, model: "m", explanation: attribution.map });
  assert.deepEqual(received.evaluate.at(-1)!.explanation?.values, Array.from(attribution.map.values));

  await assert.rejects(
    client.evaluateAttribution({ image: IMAGE, model: "missing-metric", explanation: MAP }),
    /results of insertion/,
  );
});
