/**
 * One fake propscope service in this process on a loopback port, and a client of it: what the
 * unit tests of the client's calls share (the service's answers are each test's own).
 */

import path from "node:path";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { getProtoPath } from "google-proto-files";

import { createClient, type PropscopeClient } from "../src";

// dist/test/ -> the package root -> the repository's protos/.
const PROTO_DIR = path.resolve(__dirname, "..", "..", "..", "..", "protos");

export interface FakeService {
  client: PropscopeClient;
  /** Closes the client and stops the server. */
  close(): void;
}

/**
 * Serves `handlers` as the service `pick` chooses from `protoFile` (e.g.
 * "propscope/v1/graph.proto", loaded as the client's contract is: camelCase, defaults, oneofs).
 */
export async function serveFake<Proto>(
  protoFile: string,
  pick: (proto: Proto) => { service: grpc.ServiceDefinition },
  handlers: grpc.UntypedServiceImplementation,
): Promise<FakeService> {
  const definition = protoLoader.loadSync(protoFile, {
    keepCase: false,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
    includeDirs: [PROTO_DIR, path.dirname(getProtoPath())],
  });
  const proto = grpc.loadPackageDefinition(definition) as unknown as Proto;
  const server = new grpc.Server();
  server.addService(pick(proto).service, handlers);
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (error, bound) =>
      error ? reject(error) : resolve(bound),
    ),
  );
  const client = createClient(`127.0.0.1:${port}`);
  return {
    client,
    close() {
      client.close();
      server.forceShutdown();
    },
  };
}
