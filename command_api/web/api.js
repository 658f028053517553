// HTTP to the command API (this origin) and the query API (another origin, CORS): bearer token in a
// header, never in a URL; every command with an Idempotency-Key, retried with the same key until the
// server gives a definite answer, so a retry after a drop never doubles anything.

import { backoffMs } from "./connection.js";

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.title || `HTTP ${status}`);
    this.status = status;
    this.slug = (problem.type || "").replace("/problems/", "");
    this.problem = problem;
  }
}

// No definite answer yet: the command may or may not have been appended; the same key makes a retry safe.
const retried = (status) => status === 408 || status === 429 || status >= 500;
const MAX_ATTEMPTS = 8;

export function newKey() {
  return crypto.randomUUID();
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function onlineAgain() {
  return new Promise((resolve) => window.addEventListener("online", resolve, { once: true }));
}

export class Api {
  constructor({ queryUrl, getToken }) {
    this.queryUrl = queryUrl.replace(/\/$/, "");
    this.getToken = getToken;
    // True once the query API answered with X-Parley-Cursor: it then also accepts a cursor as `position`.
    this.cursorAware = false;
  }

  async fetchJson(url, init = {}, fresh = false) {
    const token = await this.getToken(fresh);
    const headers = { ...(init.headers || {}), Authorization: `Bearer ${token}` };
    const response = await fetch(url, { ...init, headers, credentials: "omit", cache: "no-store" });
    if (response.status === 401 && !fresh) return this.fetchJson(url, init, true);
    const text = await response.text();
    const body = text ? JSON.parse(text) : {};
    if (!response.ok) throw new ApiError(response.status, body);
    const cursor = response.headers.get("X-Parley-Cursor") || body.cursor || null;
    if (cursor) this.cursorAware = true;
    return { body, cursor, replayed: response.headers.get("Idempotent-Replayed") === "true" };
  }

  /**
   * GET from the query API, answered once the read models reached `position`: a command's
   * `position_token`, or a fanout cursor (sent only to a query API that hands out cursors itself).
   */
  query(path, params = {}, { token = null, cursor = null } = {}) {
    const url = new URL(this.queryUrl + path);
    for (const [name, value] of Object.entries(params)) {
      if (value !== undefined && value !== null) url.searchParams.set(name, String(value));
    }
    const position = token || (this.cursorAware ? cursor : null);
    if (position) url.searchParams.set("position", position);
    return this.fetchJson(url.toString());
  }

  /** A command, retried with one Idempotency-Key on network errors and retryable answers. */
  async command(method, path, body = undefined, key = newKey()) {
    const init = { method, headers: { "Idempotency-Key": key } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.fetchJson(path, init);
      } catch (err) {
        const retry = !(err instanceof ApiError) || retried(err.status);
        if (!retry || attempt + 1 >= MAX_ATTEMPTS) throw err;
      }
      if (!navigator.onLine) await onlineAgain();
      await sleep(backoffMs(attempt + 2));
    }
  }
}
