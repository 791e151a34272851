/**
 * Sobol indices over semantic interventions (`propscope.v1.InteractionService`): the request
 * built from friendly options (the Python SDK's `Client.interactions` keywords, camelCased),
 * checked before anything is sent, and the stream gathered into one InteractionsResult.
 *
 * The gateway's editors compose the properties; for the caller's own edits, ask
 * `interactionDesign` for the design's strengths, render one image per row (each property's
 * edit in turn, at the row's strength for it) and pass them as `providedDesign` with the
 * properties' names.
 */

import { counts, modelRef, targetScoreEnum, type ModelOptions } from "./attribution";
import type { InteractionDesignRequest } from "./generated/propscope/v1/InteractionDesignRequest";
import type { InteractionsAccepted__Output } from "./generated/propscope/v1/InteractionsAccepted";
import type { InteractionsRequest } from "./generated/propscope/v1/InteractionsRequest";
import type { InteractionsResult__Output } from "./generated/propscope/v1/InteractionsResult";
import type { Property } from "./generated/propscope/v1/Property";
import { encodeImage, type ImageInput } from "./images";
import { parseProperty } from "./properties";

export interface InteractionsOptions extends ModelOptions {
  /** Two or more properties, edited in this order: Property messages or the property syntax
   * (`NAME=EDITOR:key=value`); with `providedDesign`, their names (strings without `=`). */
  properties: (Property | string)[];
  /** N, a power of two: N (P + 2) edited images; 0 or unset: the server's default (32). */
  designSize?: number;
  /** Two property names: also their second-order index (N more images). */
  pair?: [string, string];
  /** Bootstrap resamples of the intervals; 0 or unset: 1000. */
  bootstrap?: number;
  /** The intervals' level in (0, 1); unset: 0.95. */
  confidence?: number;
  /** The caller's own edits: one image per row of `interactionDesign`'s design (the same
   * designSize, properties, pair and seed), in its order. */
  providedDesign?: ImageInput[];
}

export interface InteractionDesignOptions {
  /** How many properties (at least 2). */
  properties: number;
  designSize?: number;
  /** The pair's indices (0-based). */
  pair?: [number, number];
  seed?: string | number;
}

/** A finished Interactions call: the plan, the result (`indices` per property in composition
 * order, `interactionShare`, `interactionSignificant`, `secondOrder`, costs;
 * `negligibleVariance`: the score barely moves, so `interactionSignificant` is false and the
 * share is not decided) and the plan's and result's warnings, each once. */
export interface InteractionsResult {
  requestId: string;
  accepted: InteractionsAccepted__Output;
  result: InteractionsResult__Output;
  warnings: string[];
}

/** Each design row's strengths (`rows[r][p]`, in [0, 1]) and what it is ("A", "B", "C1"...). */
export interface InteractionDesign {
  rows: number[][];
  rowKinds: string[];
}

function checkDesignSize(designSize: number | undefined): void {
  counts({ designSize }, ["designSize"]);
  if (!designSize) return;
  if (designSize < 4 || designSize & (designSize - 1)) {
    const below = Math.max(4, 2 ** Math.floor(Math.log2(designSize)));
    const above = Math.max(4, 2 ** Math.ceil(Math.log2(designSize)));
    throw new Error(
      `designSize must be a power of two in 4..1024 (0: the server's default 32), got ` +
        `${designSize}; the nearest: ${below === above ? below : `${below} or ${above}`}`,
    );
  }
  if (designSize > 1024) throw new Error(`designSize must be at most 1024, got ${designSize}`);
}

/** The InteractionsRequest of `options`; throws on a bad option before anything is sent. */
export async function buildInteractionsRequest(
  options: InteractionsOptions,
): Promise<InteractionsRequest> {
  checkDesignSize(options.designSize);
  counts(options as unknown as Record<string, unknown>, ["bootstrap"]);
  const confidence = options.confidence ?? 0;
  if (confidence !== 0 && !(confidence > 0 && confidence < 1)) {
    throw new Error(`confidence must be in (0, 1) (0: the default 0.95), got ${confidence}`);
  }
  const provided = options.providedDesign !== undefined;
  const properties = await Promise.all(
    options.properties.map((item) =>
      typeof item !== "string"
        ? item
        : provided && !item.includes("=")
          ? { name: item }
          : parseProperty(item),
    ),
  );
  if (properties.length < 2) {
    throw new Error(`properties: interactions need at least two properties, got ${properties.length}`);
  }
  const names = properties.map((property) => property.name ?? "");
  const twice = names.find((name, index) => names.indexOf(name) !== index);
  if (twice !== undefined) throw new Error(`properties: property name '${twice}' is given twice`);
  properties.forEach((property, index) => {
    if (property.providedPath) {
      throw new Error(
        `properties[${index}] ('${property.name}'): a provided path cannot compose with other ` +
          "edits; use an editor, or your own edits through providedDesign",
      );
    }
  });
  const pair = options.pair ?? [];
  if (pair.length) {
    const unknown = pair.find((name) => !names.includes(name));
    if (pair.length !== 2 || unknown !== undefined || pair[0] === pair[1]) {
      throw new Error(
        `pair must be two different property names of ${names.join(", ")}, got ${JSON.stringify(pair)}`,
      );
    }
  }
  return {
    requestId: options.requestId ?? "",
    image: await encodeImage(options.image),
    model: modelRef(options),
    properties,
    designSize: options.designSize ?? 0,
    secondOrderPair: [...pair],
    bootstrap: options.bootstrap ?? 0,
    confidence,
    targetScore: targetScoreEnum(options.targetScore),
    seed: String(options.seed ?? 0),
    providedDesign: provided
      ? { images: await Promise.all(options.providedDesign!.map((image) => encodeImage(image))) }
      : undefined,
  };
}

/** The InteractionDesignRequest of `options`; throws on a bad option before anything is sent. */
export function buildInteractionDesignRequest(
  options: InteractionDesignOptions,
): InteractionDesignRequest {
  if (!(Number.isInteger(options.properties) && options.properties >= 2)) {
    throw new Error(`properties must be an integer >= 2, got ${options.properties}`);
  }
  checkDesignSize(options.designSize);
  const pair = options.pair ?? [];
  if (
    pair.length &&
    (pair.length !== 2 ||
      pair[0] === pair[1] ||
      !pair.every((i) => Number.isInteger(i) && i >= 0 && i < options.properties))
  ) {
    throw new Error(
      `pair must be two different indices in 0..${options.properties - 1}, got ${JSON.stringify(pair)}`,
    );
  }
  return {
    properties: options.properties,
    designSize: options.designSize ?? 0,
    secondOrderPair: [...pair],
    seed: String(options.seed ?? 0),
  };
}
