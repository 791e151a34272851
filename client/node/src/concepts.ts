/**
 * CRAFT concepts (`propscope.v1.ConceptService`): the requests built from friendly options (the
 * Python SDK's `Client.fit_concepts`, `concept_bank`, `concept_maps` and `decompose_concept`
 * keywords, camelCased), checked before anything is sent; the client reads the FitConcepts /
 * DecomposeConcept streams, as every method stream, into one ConceptBank. docs/concepts.md.
 */

import * as grpc from "@grpc/grpc-js";

import { counts, modelRef, type ModelOptions } from "./attribution";
import type { ConceptBank__Output } from "./generated/propscope/v1/ConceptBank";
import type { ConceptMapsRequest } from "./generated/propscope/v1/ConceptMapsRequest";
import type { ConceptMapsResponse__Output } from "./generated/propscope/v1/ConceptMapsResponse";
import type { ConceptsAccepted__Output } from "./generated/propscope/v1/ConceptsAccepted";
import type { ConceptsProgress__Output } from "./generated/propscope/v1/ConceptsProgress";
import type { DecomposeConceptRequest } from "./generated/propscope/v1/DecomposeConceptRequest";
import type { FitConceptsRequest } from "./generated/propscope/v1/FitConceptsRequest";
import type { GetConceptBankRequest } from "./generated/propscope/v1/GetConceptBankRequest";
import type { ModelRef } from "./generated/propscope/v1/ModelRef";
import { encodeImage, type ImageInput } from "./images";

export interface FitConceptsOptions extends Omit<ModelOptions, "image" | "targetScore"> {
  /** The class's images (encoded bytes or files' paths). */
  images: ImageInput[];
  /** The layer g ends at; unset: the model's last declared layer. */
  layer?: string;
  /** Concepts; 0 or unset: 10. */
  rank?: number;
  /** Crop side in pixels; 0 or unset: 0.3 of each image's shorter side. */
  patchSize?: number;
  /** Sobol design size (a power of two); 0 or unset: 32. */
  nbDesign?: number;
  /** Top crops per concept; 0 or unset: 6. */
  topCrops?: number;
}

export interface DecomposeConceptOptions {
  bankId: string;
  /** The concept's index (its row of the bank's W). */
  concept: number;
  /** The bank's images again, in the order they were fitted (checked against its digest). */
  images: ImageInput[];
  /** The earlier layer; unset: the one before the bank's. */
  layer?: string;
  /** Sub-concepts; 0 or unset: 4. */
  rank?: number;
  nbDesign?: number;
  topCrops?: number;
  seed?: string | number;
  /** The bank's model (unset: its own name, latest version). */
  model?: string;
  modelVersion?: string;
  requestId?: string;
}

export interface BankOptions {
  /** With a model, a bank fitted on another version is refused (FAILED_PRECONDITION). */
  model?: string;
  modelVersion?: string;
}

export type ConceptsAccepted = ConceptsAccepted__Output;
export type ConceptsProgress = ConceptsProgress__Output;
/** Concepts ranked by `sobolTotalImportance`, most important first; `basis` is W, row-major
 * [rank, channels]. */
export type ConceptBank = ConceptBank__Output;
export type ConceptMaps = ConceptMapsResponse__Output;

/** A finished FitConcepts or DecomposeConcept call: its plan and the stored bank. */
export interface ConceptsResult {
  requestId: string;
  accepted: ConceptsAccepted;
  bank: ConceptBank;
}

function optionalModel(model?: string, modelVersion?: string): ModelRef | undefined {
  if (!model) {
    if (modelVersion) throw new Error("modelVersion needs model (the bank's model name)");
    return undefined;
  }
  return { name: model, version: modelVersion ?? "" };
}

function bankId(value: string): string {
  if (!/^cb_[0-9a-f]{32}$/.test(value)) {
    throw new Error(
      `bankId must be an id FitConcepts returned (cb_ and 32 hex digits), got '${value}'`,
    );
  }
  return value;
}

/** The FitConceptsRequest of `options`; throws on a bad option before anything is sent. */
export async function buildFitConceptsRequest(
  options: FitConceptsOptions,
): Promise<FitConceptsRequest> {
  counts(options as unknown as Record<string, unknown>, [
    "rank",
    "patchSize",
    "nbDesign",
    "topCrops",
  ]);
  if (!Array.isArray(options.images) || !options.images.length) {
    throw new Error("images must be a non-empty array of the class's images");
  }
  return {
    requestId: options.requestId ?? "",
    model: modelRef({ ...options, image: Buffer.alloc(0) }),
    images: await Promise.all(options.images.map((image) => encodeImage(image))),
    layer: options.layer ?? "",
    rank: options.rank ?? 0,
    patchSize: options.patchSize ?? 0,
    nbDesign: options.nbDesign ?? 0,
    seed: String(options.seed ?? 0),
    topCrops: options.topCrops ?? 0,
  };
}

/** The DecomposeConceptRequest of `options`; throws on a bad option before anything is sent. */
export async function buildDecomposeConceptRequest(
  options: DecomposeConceptOptions,
): Promise<DecomposeConceptRequest> {
  counts(options as unknown as Record<string, unknown>, [
    "concept",
    "rank",
    "nbDesign",
    "topCrops",
  ]);
  if (!Array.isArray(options.images) || !options.images.length) {
    throw new Error("images must be the bank's images, in the order they were fitted");
  }
  return {
    requestId: options.requestId ?? "",
    bankId: bankId(options.bankId),
    concept: options.concept,
    layer: options.layer ?? "",
    images: await Promise.all(options.images.map((image) => encodeImage(image))),
    rank: options.rank ?? 0,
    nbDesign: options.nbDesign ?? 0,
    seed: String(options.seed ?? 0),
    topCrops: options.topCrops ?? 0,
    model: optionalModel(options.model, options.modelVersion),
  };
}

export function buildGetConceptBankRequest(
  id: string,
  options: BankOptions = {},
): GetConceptBankRequest {
  return { bankId: bankId(id), model: optionalModel(options.model, options.modelVersion) };
}

export async function buildConceptMapsRequest(
  image: ImageInput,
  id: string,
  options: BankOptions = {},
): Promise<ConceptMapsRequest> {
  return {
    bankId: bankId(id),
    image: await encodeImage(image),
    model: optionalModel(options.model, options.modelVersion),
  };
}

/** A unary call as a promise, failures through `asError`. */
export function unary<Response>(
  start: (callback: (error: grpc.ServiceError | null, response?: Response) => void) => void,
  asError: (error: unknown) => unknown,
): Promise<Response> {
  return new Promise((resolve, reject) => {
    start((error, response) => {
      if (error || !response) reject(asError(error));
      else resolve(response);
    });
  });
}
