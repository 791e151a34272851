/**
 * Gateway targets: one address, a list of addresses, or a name a gRPC resolver expands, the
 * Python SDK's rules (client/propscope/_target.py; both test test/target-cases.json).
 *
 * One address balances connections, not calls: gRPC keeps one HTTP/2 connection per channel.
 * Over several gateways the channel holds one connection to each and picks one per call
 * (gRPC's `round_robin` policy), which needs a resolver that returns every address:
 * `dns:///NAME:PORT` (every A/AAAA record, re-resolved as it changes, e.g. a headless
 * Service) or `ipv4:`/`ipv6:` lists.
 */

import { isIP } from "node:net";

/** gRPC's load-balancing config: a connection to every address, each call to the next ready one. */
export const ROUND_ROBIN_SERVICE_CONFIG = JSON.stringify({
  loadBalancingConfig: [{ round_robin: {} }],
});

// Schemes gRPC resolves itself; a target starting with one is passed on unchanged. Of these,
// dns: and the address lists can name several gateways and are balanced.
const BALANCED_SCHEMES = new Set(["dns", "ipv4", "ipv6"]);
const OTHER_SCHEMES = new Set(["unix", "unix-abstract", "vsock", "xds", "google-c2p"]);
const LOOPBACK = new Set(["127.0.0.1", "localhost", "::1"]);
const FORMS = "HOST:PORT, a list IP:PORT,IP:PORT or dns:///NAME:PORT";

export interface Target {
  /** What the channel is opened with. */
  address: string;
  /** The host of each gateway it names (IPv6 without brackets). */
  hosts: string[];
  /** Whether calls round-robin over the addresses it resolves to. */
  balanced: boolean;
}

const quote = (text: string): string => `'${text}'`;

/**
 * `target` as the channel takes it. A single `HOST:PORT` is kept exactly as given (and gRPC's
 * default policy, pick_first); a comma-separated list of IP addresses becomes gRPC's
 * `ipv4:`/`ipv6:` list; `dns:`, `ipv4:` and `ipv6:` targets are gRPC's own syntax. A host name
 * in a list is refused: a name resolved once would pin addresses that change, and
 * `dns:///NAME:PORT` already balances over every address of a name. Throws an Error that
 * says what to write.
 */
export function parseTarget(target: string): Target {
  const text = target.trim();
  if (!text) throw new Error(`target is empty; give ${FORMS}`);
  const scheme = text.split(":", 1)[0].toLowerCase();
  if (BALANCED_SCHEMES.has(scheme) || OTHER_SCHEMES.has(scheme)) return schemeTarget(text, scheme);
  if (!text.includes(",")) {
    return { address: text, hosts: [stripBrackets(hostOf(text))], balanced: false };
  }
  const endpoints = text.split(",").map((item) => listEndpoint(text, item.trim()));
  const seen = new Set<string>();
  for (const [host, port] of endpoints) {
    const joined = join(host, port);
    if (seen.has(joined)) {
      throw new Error(`target ${quote(text)}: ${joined} is given twice; name each gateway once`);
    }
    seen.add(joined);
  }
  const families = new Set(endpoints.map(([host]) => host.includes(":")));
  if (families.size > 1) {
    throw new Error(
      `target ${quote(text)} mixes IPv4 and IPv6 addresses, which one gRPC target cannot ` +
        "hold; list addresses of one family, or use dns:///NAME:PORT",
    );
  }
  const listScheme = families.has(true) ? "ipv6" : "ipv4";
  return {
    address: `${listScheme}:` + endpoints.map(([host, port]) => join(host, port)).join(","),
    hosts: endpoints.map(([host]) => host),
    balanced: true,
  };
}

/** The channel options that spread calls over `target`'s gateways; none for one address. */
export function balancingOptions(target: Target): Record<string, string> {
  return target.balanced ? { "grpc.service_config": ROUND_ROBIN_SERVICE_CONFIG } : {};
}

/** Whether every gateway `target` names is on this machine (a plaintext token needs no warning). */
export function loopbackOnly(target: Target): boolean {
  return target.hosts.length > 0 && target.hosts.every((host) => LOOPBACK.has(host));
}

function schemeTarget(text: string, scheme: string): Target {
  const rest = text.slice(text.indexOf(":") + 1);
  if (scheme === "dns") {
    // dns:NAME:PORT, dns:///NAME:PORT or dns://AUTHORITY/NAME:PORT (a DNS server).
    const authority = rest.startsWith("//") ? rest.slice(2) : undefined;
    const name =
      authority !== undefined && authority.includes("/")
        ? authority.slice(authority.indexOf("/") + 1)
        : rest;
    if (!name || name.startsWith("/")) {
      throw new Error(`target ${quote(text)} names no host; write dns:///NAME:PORT`);
    }
    return { address: text, hosts: [hostOf(name)], balanced: true };
  }
  if (scheme === "ipv4" || scheme === "ipv6") {
    const family = Number(scheme.slice(-1));
    const hosts = rest.split(",").map((item) => {
      const host = stripBrackets(hostOf(item.trim()));
      if (isIP(host) !== family) {
        throw new Error(
          `target ${quote(text)}: ${quote(item.trim())} is not an IPv${family} address with ` +
            `a port; ${scheme}: takes IP literals only (for a name, dns:///NAME:PORT)`,
        );
      }
      return host;
    });
    return { address: text, hosts, balanced: true };
  }
  return { address: text, hosts: [], balanced: false };
}

/** One `IP:PORT` of a comma-separated list (IPv6 in brackets: `[::1]:50051`). */
function listEndpoint(text: string, item: string): [string, number] {
  const colon = item.lastIndexOf(":");
  const host = colon < 0 ? "" : item.slice(0, colon);
  const portText = colon < 0 ? "" : item.slice(colon + 1);
  const port = Number(portText);
  if (!item || !host || !/^\d+$/.test(portText) || port < 1 || port > 65535) {
    throw new Error(
      `target ${quote(text)}: ${quote(item)} is not HOST:PORT (a port 1-65535); each ` +
        "gateway of a list is IP:PORT, separated by commas",
    );
  }
  const bare = stripBrackets(host);
  const family = isIP(bare);
  if (family === 0) {
    throw new Error(
      `target ${quote(text)}: ${quote(host)} is a host name, and a list takes IP addresses ` +
        `(e.g. 127.0.0.1:${port} for localhost). For a name with several addresses use ` +
        `dns:///${host}:${port} (every address a gateway, re-resolved as it changes: a ` +
        "headless Service), or put a load balancer or mesh at one address",
    );
  }
  if (family === 6 && bare === host) {
    throw new Error(`target ${quote(text)}: write the IPv6 address in brackets, [${host}]:${port}`);
  }
  return [bare, port];
}

/** The host of `HOST[:PORT]` (IPv6 in brackets). */
function hostOf(endpoint: string): string {
  if (endpoint.startsWith("[")) {
    const end = endpoint.indexOf("]");
    return end < 0 ? endpoint : endpoint.slice(0, end + 1);
  }
  const colons = endpoint.split(":").length - 1;
  return colons === 1 ? endpoint.slice(0, endpoint.lastIndexOf(":")) : endpoint;
}

function stripBrackets(host: string): string {
  return host.startsWith("[") && host.endsWith("]") ? host.slice(1, -1) : host;
}

function join(host: string, port: number): string {
  return host.includes(":") ? `[${host}]:${port}` : `${host}:${port}`;
}
