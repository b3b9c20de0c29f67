// Preloaded into the conformance CLI (NODE_OPTIONS="--import <this file>") with
// MCP_BEARER set: the suite has no option for request headers, so this adds
// `Authorization: Bearer $MCP_BEARER` to every HTTP request it makes, and the
// gateway under test keeps its real bearer auth on. A request that already has an
// Authorization header is left alone.
//
// The suite sends in three ways, each wrapped here:
// - the global fetch() (the MCP SDK's client transport) and undici's request()
//   (dns-rebinding-protection, which sets Host and Origin itself) both go through
//   undici's global dispatcher;
// - node:http's request() (http-header-validation, which sends raw headers).
import http from "node:http";

const token = process.env.MCP_BEARER;
if (!token) throw new Error("inject-auth.mjs: set MCP_BEARER to the token to send");
const bearer = `Bearer ${token}`;

function withAuth(headers) {
  if (headers == null) return { authorization: bearer };
  if (Array.isArray(headers)) {
    // Flat [name, value, name, value, …].
    for (let i = 0; i < headers.length; i += 2) {
      if (String(headers[i]).toLowerCase() === "authorization") return headers;
    }
    return [...headers, "authorization", bearer];
  }
  if (typeof headers[Symbol.iterator] === "function") return withAuth([...headers].flat());
  if (Object.keys(headers).some((name) => name.toLowerCase() === "authorization")) return headers;
  return { ...headers, authorization: bearer };
}

// undici's global dispatcher (Node's bundled undici installs it when it loads).
const KEY = Symbol.for("undici.globalDispatcher.1");
void new Headers(); // loads Node's bundled undici
const dispatcher = globalThis[KEY];
if (!dispatcher || typeof dispatcher.dispatch !== "function") {
  throw new Error("inject-auth.mjs: no undici global dispatcher to wrap (Node 22 expected)");
}
globalThis[KEY] = new Proxy(dispatcher, {
  get(target, prop) {
    if (prop === "dispatch") {
      return (opts, handler) => target.dispatch({ ...opts, headers: withAuth(opts.headers) }, handler);
    }
    const value = Reflect.get(target, prop, target);
    return typeof value === "function" ? value.bind(target) : value;
  },
});

// node:http's request(options[, cb]) and request(url[, options][, cb]).
const httpRequest = http.request;
http.request = (...args) => {
  const at = typeof args[0] === "string" || args[0] instanceof URL ? 1 : 0;
  if (typeof args[at] === "function" || args[at] === undefined) args.splice(at, 0, {});
  args[at] = { ...args[at], headers: withAuth(args[at].headers) };
  return httpRequest(...args);
};
