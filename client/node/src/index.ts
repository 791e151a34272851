/**
 * A typed client of the propscope gateway (`propscope.v1.ExplainService`,
 * `AttributionService`, `CausalGraphService`, `ConceptService` and `InteractionService`) over
 * @grpc/grpc-js.
 *
 * `npm run build` bundles the contract (the repository's `protos/` and the google.rpc messages
 * they use) into `./generated/contract` and generates the types in `./generated` from the same
 * files with the same options, so the installed package reads no .proto file.
 */

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import * as protobuf from "protobufjs";

import {
  attributionFrom,
  buildAttributeRequest,
  buildEvaluateAttributionRequest,
  type Attribution,
  type AttributeOptions,
  type EvaluateOptions,
  type Evaluation,
} from "./attribution";
import type { ProtoGrpcType as AttributionProtoGrpcType } from "./generated/attribution";
import {
  buildConceptMapsRequest,
  buildDecomposeConceptRequest,
  buildFitConceptsRequest,
  buildGetConceptBankRequest,
  unary,
  type BankOptions,
  type ConceptBank,
  type ConceptsAccepted,
  type ConceptMaps,
  type ConceptsProgress,
  type ConceptsResult,
  type DecomposeConceptOptions,
  type FitConceptsOptions,
} from "./concepts";
import type { ProtoGrpcType as ConceptsProtoGrpcType } from "./generated/concepts";
import type { DecomposeConceptEvent__Output } from "./generated/propscope/v1/DecomposeConceptEvent";
import type { FitConceptsEvent__Output } from "./generated/propscope/v1/FitConceptsEvent";
import type { ProtoGrpcType as GraphProtoGrpcType } from "./generated/graph";
import type { ProtoGrpcType as InteractionsProtoGrpcType } from "./generated/interactions";
import type { InteractionDesignResponse__Output } from "./generated/propscope/v1/InteractionDesignResponse";
import type { InteractionsAccepted__Output } from "./generated/propscope/v1/InteractionsAccepted";
import type { InteractionsProgress__Output } from "./generated/propscope/v1/InteractionsProgress";
import type { InteractionsResult__Output } from "./generated/propscope/v1/InteractionsResult";
import {
  buildInteractionDesignRequest,
  buildInteractionsRequest,
  type InteractionDesign,
  type InteractionDesignOptions,
  type InteractionsOptions,
  type InteractionsResult,
} from "./interactions";
import type { GraphAccepted__Output } from "./generated/propscope/v1/GraphAccepted";
import type { GraphDone__Output } from "./generated/propscope/v1/GraphDone";
import type { GraphProgress__Output } from "./generated/propscope/v1/GraphProgress";
import {
  buildGraphRequest,
  type GraphEdge,
  type GraphNode,
  type GraphOptions,
  type GraphRepair,
  type GraphResult,
  type TaskGraph,
} from "./graph";
import { CONTRACT } from "./generated/contract";
import type { ImageInput } from "./images";
import type { ProtoGrpcType } from "./generated/explain";
import type { AttributeAccepted__Output } from "./generated/propscope/v1/AttributeAccepted";
import type { AttributeProgress__Output } from "./generated/propscope/v1/AttributeProgress";
import type { AttributionResult__Output } from "./generated/propscope/v1/AttributionResult";
import type { EvaluationAccepted__Output } from "./generated/propscope/v1/EvaluationAccepted";
import type { MetricResult__Output } from "./generated/propscope/v1/MetricResult";
import type { Accepted__Output } from "./generated/propscope/v1/Accepted";
import type { Done__Output } from "./generated/propscope/v1/Done";
import type { ExplainRequest } from "./generated/propscope/v1/ExplainRequest";
import type { ModelInfo__Output } from "./generated/propscope/v1/ModelInfo";
import type { Progress__Output } from "./generated/propscope/v1/Progress";
import type { PropertyResult__Output } from "./generated/propscope/v1/PropertyResult";
import { balancingOptions, loopbackOnly, parseTarget } from "./target";

export {
  buildConceptMapsRequest,
  buildDecomposeConceptRequest,
  buildFitConceptsRequest,
  buildGetConceptBankRequest,
  type BankOptions,
  type ConceptBank,
  type ConceptMaps,
  type ConceptsAccepted,
  type ConceptsProgress,
  type ConceptsResult,
  type DecomposeConceptOptions,
  type FitConceptsOptions,
} from "./concepts";
export {
  METRICS,
  attributionFrom,
  buildAttributeRequest,
  buildEvaluateAttributionRequest,
  mapArray,
  mapMessage,
  type Attribution,
  type AttributeOptions,
  type Baseline,
  type Bound,
  type Estimator,
  type EvaBounds,
  type EvaDecision,
  type EvaluateOptions,
  type Evaluation,
  type MapArray,
  type Method,
  type MethodOptions,
  type Metric,
  type ModelOptions,
  type PerturbationKind,
  type PerturbationOptions,
  type TargetScore,
} from "./attribution";
export {
  buildGraphRequest,
  type GraphBaseline,
  type GraphEdge,
  type GraphNode,
  type GraphOptions,
  type GraphRepair,
  type GraphResult,
  type TaskGraph,
} from "./graph";
export {
  buildInteractionDesignRequest,
  buildInteractionsRequest,
  type InteractionDesign,
  type InteractionDesignOptions,
  type InteractionsOptions,
  type InteractionsResult,
} from "./interactions";
export {
  ALPHA_DROPPED,
  FOLDER_IMAGE_SUFFIXES,
  READABLE_FORMATS,
  encodeImage,
  encodeMask,
  type ImageInput,
} from "./images";
export {
  PROPERTY_SYNTAX,
  REGION_SYNTAX,
  naturalCompare,
  parseProperty,
  splitProperty,
  type ParseOptions,
  type PropertyText,
  type RegionText,
} from "./properties";
export {
  buildExplainRequest,
  type ExplainOptions,
  type OutputKind,
  type PathMode,
  type PreprocessingOptions,
  type ResizeMode,
} from "./request";
export { ROUND_ROBIN_SERVICE_CONFIG, parseTarget, type Target } from "./target";
export type { ExplainRequest } from "./generated/propscope/v1/ExplainRequest";
export type { Property } from "./generated/propscope/v1/Property";
export type { Decision__Output as Decision } from "./generated/propscope/v1/Decision";
export type { Preprocessing__Output as Preprocessing } from "./generated/propscope/v1/Preprocessing";

// The options of proto-loader-gen-types in package.json's build script, so that the generated
// types describe what arrives: uint64 seeds as decimal strings (no precision lost), enums by
// name, unset fields as their defaults, and `event` naming the member of the oneof that is set.
// Field names are camelCased (propertyResult, pValue) in the bundled contract itself.
const LOADER_OPTIONS: protoLoader.Options = {
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
};
// Results with returnPathImages hold many PNGs (the Python SDK allows the same).
const MAX_RECEIVE_MESSAGE_BYTES = 256 * 1024 * 1024;
// The trailer in which the gateway sends the rich google.rpc.Status of a refusal.
const STATUS_DETAILS_KEY = "grpc-status-details-bin";
const BAD_REQUEST_TYPE_URL = "type.googleapis.com/google.rpc.BadRequest";

export type Accepted = Accepted__Output;
export type Progress = Progress__Output;
export type PropertyResult = PropertyResult__Output;
export type Done = Done__Output;
export type ModelInfo = ModelInfo__Output;
export type AttributeAccepted = AttributeAccepted__Output;
export type AttributeProgress = AttributeProgress__Output;
export type EvaluationAccepted = EvaluationAccepted__Output;
export type MetricResult = MetricResult__Output;
export type GraphProgress = GraphProgress__Output;
export type InteractionsProgress = InteractionsProgress__Output;

/** One event of an Explain stream: Accepted first, Progress and PropertyResult, Done last. */
export type ExplainEvent = { requestId: string } & (
  | { event: "accepted"; accepted: Accepted }
  | { event: "progress"; progress: Progress }
  | { event: "propertyResult"; propertyResult: PropertyResult }
  | { event: "done"; done: Done }
);

export interface ClientOptions {
  /** The gateway's bearer token, sent as `authorization: Bearer <token>`. */
  token?: string;
  /** TLS credentials (`grpc.credentials.createSsl(...)`); without them the channel is plaintext. */
  credentials?: grpc.ChannelCredentials;
  /** Sent with every call. */
  metadata?: Record<string, string>;
  /** Extra gRPC channel options (`grpc.keepalive_time_ms`, ...); same keys win over the client's. */
  channelOptions?: grpc.ChannelOptions;
}

export interface CallOptions {
  /** When the call (for explain, the whole stream) is cancelled: a Date or epoch milliseconds. */
  deadline?: grpc.Deadline;
}

export interface AttributionCallOptions extends CallOptions {
  /** Called as forward passes complete (done of total). */
  onProgress?: (progress: AttributeProgress) => void;
}

export interface FieldViolation {
  field: string;
  description: string;
}

/** A failed call: the gRPC status and, for a refused request, the fields to change. */
export class PropscopeError extends Error {
  constructor(
    readonly code: grpc.status,
    readonly details: string,
    readonly fieldViolations: FieldViolation[],
  ) {
    super(`${grpc.status[code] ?? "UNKNOWN"}: ${details}`);
    this.name = "PropscopeError";
  }

  /** The status code's name, e.g. "NOT_FOUND". */
  get codeName(): string {
    return grpc.status[this.code] ?? "UNKNOWN";
  }
}

export interface PropscopeClient {
  /**
   * Streams the explanation of `request.model`'s prediction on `request.image`. The request is
   * sent as it is (`buildExplainRequest` converts images). Breaking out of the loop cancels the
   * call; a failed call throws a PropscopeError, also midway.
   */
  explain(request: ExplainRequest, options?: CallOptions): AsyncIterable<ExplainEvent>;
  /**
   * One attribution map of `options.model` on `options.image` (Sobol by default, RISE, or
   * EVA's verified bounds on an open model); resolves when the map is done. Bad options throw
   * before anything is sent; a failed call rejects with a PropscopeError.
   */
  attribute(options: AttributeOptions, callOptions?: AttributionCallOptions): Promise<Attribution>;
  /**
   * Scores a map (`options.explanation`, e.g. `attribution.map`) with fidelity metrics:
   * deletion, insertion, mu_fidelity and stability. Errors as for attribute.
   */
  evaluateAttribution(
    options: EvaluateOptions,
    callOptions?: AttributionCallOptions & { onMetric?: (metric: MetricResult) => void },
  ): Promise<Evaluation>;
  /**
   * The causal explanatory graph of `options.model`'s hidden channels on `options.images`
   * (an open model: it declares its layers and takes interventions); resolves with every
   * node and edge, the task graph (several images) and the repair (with `repairProperty`).
   * A black-box model rejects with FAILED_PRECONDITION. Errors as for attribute.
   */
  graph(
    options: GraphOptions,
    callOptions?: CallOptions & {
      onProgress?: (progress: GraphProgress) => void;
      onItem?: (item: { node: GraphNode } | { edge: GraphEdge }) => void;
    },
  ): Promise<GraphResult>;
  /**
   * CRAFT concepts of `options.model`'s class on the class's `options.images` (an open model);
   * resolves with the plan and the stored ConceptBank (concepts ranked by Sobol importance).
   * Errors as for attribute.
   */
  fitConcepts(
    options: FitConceptsOptions,
    callOptions?: CallOptions & { onProgress?: (progress: ConceptsProgress) => void },
  ): Promise<ConceptsResult>;
  /** A stored bank; with `model`, a bank of another version is refused ("stale bank"). */
  conceptBank(bankId: string, options?: BankOptions & CallOptions): Promise<ConceptBank>;
  /** `image`'s concept maps: each concept's coefficient per position, resized to the image. */
  conceptMaps(
    image: ImageInput,
    bankId: string,
    options?: BankOptions & CallOptions,
  ): Promise<ConceptMaps>;
  /** CRAFT's recursive decomposition of one concept at an earlier layer: a child bank. */
  decomposeConcept(
    options: DecomposeConceptOptions,
    callOptions?: CallOptions & { onProgress?: (progress: ConceptsProgress) => void },
  ): Promise<ConceptsResult>;
  /**
   * Sobol first- and total-order indices of `options.model`'s score on `options.image` over
   * the strengths of two or more `options.properties` (each design image is every property's
   * edit in turn, in the order given), with bootstrap intervals, and the interaction share
   * (sum of total minus sum of first order). Errors as for attribute.
   */
  interactions(
    options: InteractionsOptions,
    callOptions?: CallOptions & { onProgress?: (progress: InteractionsProgress) => void },
  ): Promise<InteractionsResult>;
  /** The design's strengths row by row, for `interactions` with your own edits
   * (`providedDesign`): render row r by editing property p at `rows[r][p]`, in turn. */
  interactionDesign(
    options: InteractionDesignOptions,
    callOptions?: CallOptions,
  ): Promise<InteractionDesign>;
  /** The classifiers and editors the gateway's Triton server serves. */
  listModels(options?: CallOptions): Promise<ModelInfo[]>;
  /** Closes the channel; calls in flight are cancelled. */
  close(): void;
}

/**
 * A client of the gateway at `target`: `host:port`, or several gateways, `dns:///name:port`
 * (every address of the name, e.g. a headless Service), a comma-separated list of IP addresses
 * `10.0.0.1:50051,10.0.0.2:50051` or gRPC's `ipv4:`/`ipv6:` lists; calls (not connections) then
 * round-robin over them. A target that cannot be used throws an Error that says what to write.
 */
export function createClient(target: string, options: ClientOptions = {}): PropscopeClient {
  const resolved = parseTarget(target);
  if (options.token && !options.credentials && !loopbackOnly(resolved)) {
    process.emitWarning(`sending a bearer token to ${target} over a plaintext channel`);
  }
  const credentials = options.credentials ?? grpc.credentials.createInsecure();
  const channelOptions = {
    "grpc.max_receive_message_length": MAX_RECEIVE_MESSAGE_BYTES,
    ...balancingOptions(resolved),
    ...options.channelOptions,
  };
  const address = resolved.address;
  const stub = new (services().explain)(address, credentials, channelOptions);
  // The other stubs share the first one's channel.
  const attributionStub = new (services().attribution)(address, credentials, {
    channelOverride: stub.getChannel(),
  });
  const graphStub = new (services().graph)(address, credentials, {
    channelOverride: stub.getChannel(),
  });
  const conceptsStub = new (services().concepts)(address, credentials, {
    channelOverride: stub.getChannel(),
  });
  const interactionsStub = new (services().interactions)(address, credentials, {
    channelOverride: stub.getChannel(),
  });
  const metadata = (): grpc.Metadata => {
    const sent = new grpc.Metadata();
    for (const [key, value] of Object.entries(options.metadata ?? {})) sent.add(key, value);
    if (options.token) sent.add("authorization", `Bearer ${options.token}`);
    return sent;
  };
  return {
    async *explain(request, { deadline } = {}) {
      const call = stub.Explain(request, metadata(), { deadline });
      try {
        for await (const message of call) {
          // An event kind this proto does not know yet (a newer server) is skipped.
          if (message.event) yield message as ExplainEvent;
        }
      } catch (error) {
        throw asPropscopeError(error);
      } finally {
        call.cancel();
      }
    },
    async attribute(attributeOptions, { deadline, onProgress } = {}) {
      const request = await buildAttributeRequest(attributeOptions);
      const call = attributionStub.Attribute(request, metadata(), { deadline });
      let requestId = request.requestId ?? "";
      let accepted: AttributeAccepted | undefined;
      let result: AttributionResult__Output | undefined;
      await readStream(call, (message) => {
        requestId = message.requestId || requestId;
        if (message.accepted) accepted = message.accepted;
        if (message.progress) onProgress?.(message.progress);
        if (message.result) result = message.result;
      });
      if (!accepted || !result) throw incomplete("Attribute", "the plan and the map");
      try {
        return attributionFrom(requestId, accepted, result);
      } catch (error) {
        throw new PropscopeError(grpc.status.INTERNAL, (error as Error).message, []);
      }
    },
    async evaluateAttribution(evaluateOptions, { deadline, onProgress, onMetric } = {}) {
      const request = await buildEvaluateAttributionRequest(evaluateOptions);
      const call = attributionStub.EvaluateAttribution(request, metadata(), { deadline });
      let requestId = request.requestId ?? "";
      let accepted: EvaluationAccepted | undefined;
      const results: MetricResult[] = [];
      await readStream(call, (message) => {
        requestId = message.requestId || requestId;
        if (message.accepted) accepted = message.accepted;
        if (message.progress) onProgress?.(message.progress);
        if (message.metric) {
          results.push(message.metric);
          onMetric?.(message.metric);
        }
      });
      if (!accepted) throw incomplete("EvaluateAttribution", "the plan");
      const missing = accepted.metrics.filter((name) => !results.some((r) => r.metric === name));
      if (missing.length) {
        throw incomplete("EvaluateAttribution", `the results of ${missing.join(", ")}`);
      }
      return { requestId, accepted, results };
    },
    async graph(graphOptions, { deadline, onProgress, onItem } = {}) {
      const request = await buildGraphRequest(graphOptions);
      const call = graphStub.BuildGraph(request, metadata(), { deadline });
      let requestId = request.requestId ?? "";
      let accepted: GraphAccepted__Output | undefined;
      let done: GraphDone__Output | undefined;
      let taskGraph: TaskGraph | null = null;
      let repair: GraphRepair | null = null;
      const nodes: GraphNode[] = [];
      const edges: GraphEdge[] = [];
      await readStream(call, (message) => {
        requestId = message.requestId || requestId;
        if (message.accepted) accepted = message.accepted;
        if (message.progress) onProgress?.(message.progress);
        if (message.node) {
          nodes.push(message.node);
          onItem?.({ node: message.node });
        }
        if (message.edge) {
          edges.push(message.edge);
          onItem?.({ edge: message.edge });
        }
        if (message.taskGraph) taskGraph = message.taskGraph;
        if (message.repair) repair = message.repair;
        if (message.done) done = message.done;
      });
      if (!accepted || !done) {
        throw incomplete("BuildGraph", "the plan and its end (GraphAccepted and GraphDone)");
      }
      const warnings = [...accepted.warnings, ...done.warnings];
      return { requestId, accepted, nodes, edges, taskGraph, repair, done, warnings };
    },
    async fitConcepts(conceptOptions, { deadline, onProgress } = {}) {
      const request = await buildFitConceptsRequest(conceptOptions);
      const call = conceptsStub.FitConcepts(request, metadata(), { deadline });
      const requestId = request.requestId ?? "";
      return gatherConcepts(call, requestId, onProgress);
    },
    async decomposeConcept(conceptOptions, { deadline, onProgress } = {}) {
      const request = await buildDecomposeConceptRequest(conceptOptions);
      const call = conceptsStub.DecomposeConcept(request, metadata(), { deadline });
      const requestId = request.requestId ?? "";
      return gatherConcepts(call, requestId, onProgress);
    },
    async conceptBank(id, { deadline, ...bank } = {}) {
      const request = buildGetConceptBankRequest(id, bank);
      return unary<ConceptBank>(
        (done) => conceptsStub.GetConceptBank(request, metadata(), { deadline }, done),
        asPropscopeError,
      );
    },
    async conceptMaps(image, id, { deadline, ...bank } = {}) {
      const request = await buildConceptMapsRequest(image, id, bank);
      return unary<ConceptMaps>(
        (done) => conceptsStub.ConceptMaps(request, metadata(), { deadline }, done),
        asPropscopeError,
      );
    },
    async interactions(interactionOptions, { deadline, onProgress } = {}) {
      const request = await buildInteractionsRequest(interactionOptions);
      const call = interactionsStub.Interactions(request, metadata(), { deadline });
      let requestId = request.requestId ?? "";
      let accepted: InteractionsAccepted__Output | undefined;
      let result: InteractionsResult__Output | undefined;
      await readStream(call, (message) => {
        requestId = message.requestId || requestId;
        if (message.accepted) accepted = message.accepted;
        if (message.progress) onProgress?.(message.progress);
        if (message.result) result = message.result;
      });
      if (!accepted || !result) {
        throw incomplete("Interactions", "the plan and the result");
      }
      const warnings = [...new Set([...accepted.warnings, ...result.warnings])];
      return { requestId, accepted, result, warnings };
    },
    async interactionDesign(designOptions, { deadline } = {}) {
      const request = buildInteractionDesignRequest(designOptions);
      const response = await unary<InteractionDesignResponse__Output>(
        (done) => interactionsStub.InteractionDesign(request, metadata(), { deadline }, done),
        asPropscopeError,
      );
      return { rows: response.rows.map((row) => row.strengths), rowKinds: response.rowKinds };
    },
    listModels({ deadline } = {}) {
      return new Promise((resolve, reject) => {
        stub.ListModels({}, metadata(), { deadline }, (error, response) => {
          if (error || !response) reject(asPropscopeError(error));
          else resolve(response.models);
        });
      });
    },
    close() {
      interactionsStub.close();
      conceptsStub.close();
      graphStub.close();
      attributionStub.close();
      stub.close();
    },
  };
}

interface Services {
  explain: ProtoGrpcType["propscope"]["v1"]["ExplainService"];
  attribution: AttributionProtoGrpcType["propscope"]["v1"]["AttributionService"];
  graph: GraphProtoGrpcType["propscope"]["v1"]["CausalGraphService"];
  concepts: ConceptsProtoGrpcType["propscope"]["v1"]["ConceptService"];
  interactions: InteractionsProtoGrpcType["propscope"]["v1"]["InteractionService"];
}

let loadedServices: Services | undefined;

/** The services' client classes, loaded once and only when a client is made. */
function services(): Services {
  if (!loadedServices) {
    const definition = protoLoader.fromJSON(CONTRACT, LOADER_OPTIONS);
    const proto = grpc.loadPackageDefinition(definition) as unknown as ProtoGrpcType &
      AttributionProtoGrpcType &
      GraphProtoGrpcType &
      ConceptsProtoGrpcType &
      InteractionsProtoGrpcType;
    loadedServices = {
      explain: proto.propscope.v1.ExplainService,
      attribution: proto.propscope.v1.AttributionService,
      graph: proto.propscope.v1.CausalGraphService,
      concepts: proto.propscope.v1.ConceptService,
      interactions: proto.propscope.v1.InteractionService,
    };
  }
  return loadedServices;
}

/** Reads a server stream to its end, each message to `onMessage`: a gRPC error becomes a
 * PropscopeError, and the call is cancelled however the reading ends. */
async function readStream<M>(
  call: AsyncIterable<M> & { cancel(): void },
  onMessage: (message: M) => void,
): Promise<void> {
  try {
    for await (const message of call) onMessage(message);
  } catch (error) {
    throw asPropscopeError(error);
  } finally {
    call.cancel();
  }
}

/** Gathers a FitConcepts / DecomposeConcept stream: the plan and the bank. */
async function gatherConcepts(
  call: AsyncIterable<FitConceptsEvent__Output | DecomposeConceptEvent__Output> & {
    cancel(): void;
  },
  requestId: string,
  onProgress: ((progress: ConceptsProgress) => void) | undefined,
): Promise<ConceptsResult> {
  let accepted: ConceptsAccepted | undefined;
  let bank: ConceptBank | undefined;
  await readStream(call, (message) => {
    requestId = message.requestId || requestId;
    if (message.accepted) accepted = message.accepted;
    if (message.progress) onProgress?.(message.progress);
    if (message.done) bank = message.done;
  });
  if (!accepted || !bank) {
    throw incomplete("FitConcepts", "the plan and its bank (ConceptsAccepted and ConceptBank)");
  }
  return { requestId, accepted, bank };
}

/** A stream that ended OK without what the contract promises: a server fault. */
function incomplete(rpc: string, what: string): PropscopeError {
  return new PropscopeError(
    grpc.status.INTERNAL,
    `the ${rpc} stream ended without ${what} (a server fault)`,
    [],
  );
}

function asPropscopeError(error: unknown): unknown {
  const failed = error as Partial<grpc.ServiceError> | null;
  if (typeof failed?.code !== "number") return error;
  return new PropscopeError(
    failed.code,
    failed.details ?? "",
    fieldViolations(failed.metadata?.get(STATUS_DETAILS_KEY)[0]),
  );
}

// Field names as in the bundled contract: camelCased, but for protobufjs's own
// google.protobuf.Any, which keeps its .proto names.
interface DecodedStatus {
  details: { type_url: string; value: Uint8Array }[];
}

interface DecodedBadRequest {
  fieldViolations: FieldViolation[];
}

let contractRoot: protobuf.Root | undefined;

/** The google.rpc.BadRequest field violations of a rich status trailer, if any. */
function fieldViolations(statusDetails: grpc.MetadataValue | undefined): FieldViolation[] {
  if (!Buffer.isBuffer(statusDetails)) return [];
  try {
    contractRoot ??= protobuf.Root.fromJSON(CONTRACT);
    const status = contractRoot.lookupType("google.rpc.Status").decode(statusDetails) as unknown;
    const badRequest = contractRoot.lookupType("google.rpc.BadRequest");
    return (status as DecodedStatus).details
      .filter((detail) => detail.type_url === BAD_REQUEST_TYPE_URL)
      .flatMap((detail) => {
        const decoded = badRequest.decode(detail.value) as unknown;
        return (decoded as DecodedBadRequest).fieldViolations;
      })
      .map(({ field, description }) => ({ field, description }));
  } catch {
    return []; // an unreadable trailer must not hide the call's own error
  }
}
