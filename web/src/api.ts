// The page's one client of the server: gRPC-web to the origin that served the page (so no CORS),
// with the bearer token of this tab when the server wants one.

import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { ModelLoader } from "./gen/modelloader/v1/model_loader_pb.js";

// sessionStorage, not localStorage: the token lives as long as the tab and is never shared with
// other tabs or written to disk for later.
const TOKEN_KEY = "model-loader-token";

export function token(): string | null {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(value: string | null): void {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

const bearer: Interceptor = (next) => (req) => {
  const t = token();
  if (t) req.header.set("authorization", `Bearer ${t}`);
  return next(req);
};

export type Api = Client<typeof ModelLoader>;

export function connect(): Api {
  const transport = createGrpcWebTransport({ baseUrl: location.origin, interceptors: [bearer] });
  return createClient(ModelLoader, transport);
}

/** A failed call as a person reads it: the gRPC code's name, the kind and the server's message. */
export function describe(err: unknown): string {
  const e = ConnectError.from(err);
  // Code's names are CamelCase ("FailedPrecondition"); gRPC's own spelling is FAILED_PRECONDITION.
  const name = (Code[e.code] ?? String(e.code)).replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
  // The server's stable kind of the failure, when it sends one (see ModelStatus.error_kind).
  const kind = e.metadata.get("model-loader-error-kind");
  return `${name}${kind ? ` (${kind})` : ""}: ${e.rawMessage}`;
}

export function code(err: unknown): Code {
  return ConnectError.from(err).code;
}

export { Code };
