/**
 * fitConcepts(), conceptBank(), conceptMaps() and decomposeConcept() against an in-process fake
 * ConceptService (pure client logic: the requests built from the options, the stream gathered
 * into one result, errors); the real gateway's answers are checked by the integration tests.
 */

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import * as grpc from "@grpc/grpc-js";

import { buildFitConceptsRequest, PropscopeError, type PropscopeClient } from "../src";
import type { ProtoGrpcType } from "../src/generated/concepts";
import type { ConceptMapsRequest__Output } from "../src/generated/propscope/v1/ConceptMapsRequest";
import type { FitConceptsEvent } from "../src/generated/propscope/v1/FitConceptsEvent";
import type { FitConceptsRequest__Output } from "../src/generated/propscope/v1/FitConceptsRequest";
import type { GetConceptBankRequest__Output } from "../src/generated/propscope/v1/GetConceptBankRequest";

import { type FakeService, serveFake } from "./fake-service";

const IMAGE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 1, 2, 3]);
const BANK_ID = `cb_${"a".repeat(32)}`;

const received: FitConceptsRequest__Output[] = [];
let fake: FakeService;
let client: PropscopeClient;

const BANK = {
  bankId: BANK_ID,
  model: "synth_patch",
  modelVersion: "1",
  layer: "features.2",
  rank: 2,
  concepts: [
    { index: 1, sobolTotalImportance: 0.6, logitShare: 0.7, topCrops: [{ image: 0, png: IMAGE }] },
    { index: 0, sobolTotalImportance: 0.1, logitShare: 0.3 },
  ],
  logitShareExact: true,
  basis: [1, 0, 0, 1],
};

function fitConcepts(
  call: grpc.ServerWritableStream<FitConceptsRequest__Output, FitConceptsEvent>,
) {
  const request = call.request;
  received.push(request);
  if (request.model?.name === "blackbox") {
    call.emit("error", { code: grpc.status.FAILED_PRECONDITION, details: "needs activations" });
    return;
  }
  const requestId = request.requestId || "server-made";
  call.write({ requestId, accepted: { model: request.model?.name, rank: request.rank || 10 } });
  call.write({ requestId, progress: { passesDone: 5, passesTotal: 10 } });
  call.write({ requestId, done: BANK });
  call.end();
}

before(async () => {
  fake = await serveFake<ProtoGrpcType>(
    "propscope/v1/concepts.proto",
    (proto) => proto.propscope.v1.ConceptService,
    {
    FitConcepts: fitConcepts,
    DecomposeConcept: fitConcepts,
    GetConceptBank: (
      call: grpc.ServerUnaryCall<GetConceptBankRequest__Output, unknown>,
      done: grpc.sendUnaryData<unknown>,
    ) =>
      call.request.model?.version === "2"
        ? done({ code: grpc.status.FAILED_PRECONDITION, details: "stale bank (fitted on version 1)" })
        : done(null, BANK),
    ConceptMaps: (
      call: grpc.ServerUnaryCall<ConceptMapsRequest__Output, unknown>,
      done: grpc.sendUnaryData<unknown>,
    ) =>
      done(null, {
        bankId: call.request.bankId,
        height: 2,
        width: 2,
        maps: [{ concept: 1, values: [0, 1, 2, 3], grid: [3] }],
      }),
  },
  );
  client = fake.client;
});

after(() => fake.close());

test("fitConcepts sends the options and gathers the plan and the bank", async () => {
  const progress: number[] = [];
  const result = await client.fitConcepts(
    { images: [IMAGE, IMAGE], model: "synth_patch", targetClass: 1, rank: 2, nbDesign: 16 },
    { onProgress: (update) => progress.push(update.passesDone) },
  );
  const request = received.at(-1)!;
  assert.equal(request.images.length, 2);
  assert.equal(request.model?.targetClass, 1);
  assert.equal(request.rank, 2);
  assert.equal(request.nbDesign, 16);
  assert.deepEqual(progress, [5]);
  assert.equal(result.requestId, "server-made");
  assert.equal(result.accepted.rank, 2);
  assert.equal(result.bank.bankId, BANK_ID);
  assert.deepEqual(
    result.bank.concepts.map((concept) => concept.index),
    [1, 0],
  );
  assert.deepEqual(result.bank.concepts[0].topCrops[0].png, IMAGE);
});

test("a refused fit rejects with a PropscopeError carrying the status", async () => {
  await assert.rejects(
    client.fitConcepts({ images: [IMAGE], model: "blackbox" }),
    (error: unknown) =>
      error instanceof PropscopeError && error.codeName === "FAILED_PRECONDITION",
  );
});

test("bad options throw before anything is sent", async () => {
  await assert.rejects(buildFitConceptsRequest({ images: [], model: "m" }), /non-empty/);
  await assert.rejects(buildFitConceptsRequest({ images: [IMAGE], model: "m", rank: -1 }), /rank/);
  await assert.rejects(client.conceptBank("nope"), /cb_ and 32 hex digits/);
});

test("conceptBank, conceptMaps and decomposeConcept reach their RPCs", async () => {
  const bank = await client.conceptBank(BANK_ID, { model: "synth_patch" });
  assert.equal(bank.layer, "features.2");
  await assert.rejects(
    client.conceptBank(BANK_ID, { model: "synth_patch", modelVersion: "2" }),
    (error: unknown) => error instanceof PropscopeError && /stale bank/.test(error.details),
  );
  const maps = await client.conceptMaps(IMAGE, BANK_ID);
  assert.equal(maps.bankId, BANK_ID);
  assert.deepEqual(maps.maps[0].values, [0, 1, 2, 3]);
  const child = await client.decomposeConcept({ bankId: BANK_ID, concept: 1, images: [IMAGE] });
  assert.equal(child.bank.bankId, BANK_ID);
  assert.equal(received.at(-1)!.requestId, "");
});
