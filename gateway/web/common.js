// What both pages share: calling the gateway's HTTP API, building DOM, formatting.
// Plain ES module, no dependencies: the gateway serves it as it is.

/** An error answer of the API: its HTTP status and its {"msg"}. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** Fetch `path` from this gateway and return its JSON; throws ApiError (status 0: no answer). */
export async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    throw new ApiError(0, `cannot reach the gateway (${error.message})`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    // an answer that is not JSON: its status says enough
  }
  if (!response.ok) {
    const message = body && typeof body.msg === "string" ? body.msg : response.statusText;
    throw new ApiError(response.status, message);
  }
  return body;
}

/** POST `value` as JSON to `path`. */
export function postJson(path, value) {
  return api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(value),
  });
}

/** A new element: `el("td", {className: "num"}, "12", child)`; `attrs` keys that are not
 * properties of the element (aria-*, data-*) are set as attributes. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.includes("-") || !(key in node)) node.setAttribute(key, value === true ? "" : value);
    else node[key] = value;
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

/** A peer id as the logs show it: the last 8 characters. */
export function shortPeer(peerId) {
  return peerId ? "…" + peerId.slice(-8) : "";
}

/** Seconds, for people: "0.4 s", "12 s", "3 min 5 s". */
export function seconds(value) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "";
  if (value < 10) return `${value.toFixed(1)} s`;
  if (value < 90) return `${Math.round(value)} s`;
  const minutes = Math.floor(value / 60);
  return `${minutes} min ${Math.round(value - minutes * 60)} s`;
}

/** How models and samplers are matched: case-folded, whitespace collapsed (as the gateway). */
export function normalize(name) {
  return name.split(/\s+/).filter(Boolean).join(" ").toLowerCase();
}
