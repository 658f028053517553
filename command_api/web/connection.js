// One WebSocket to the fanout: auth -> authenticated -> subscribe, resume from the last cursor,
// reconnect with exponential backoff and full jitter, react to the browser's online/offline at once.
// The client contract this follows is in README.md (Realtime fanout, Protocol).

export const BACKOFF_BASE_MS = 250;
export const BACKOFF_CAP_MS = 10000;
// After this many attempts in a row that never reached `live`, the page polls the query API meanwhile.
export const FALLBACK_AFTER_FAILURES = 3;
const FATAL_CLOSES = new Set([4400, 4403]);

/** Full jitter: a uniform delay in [0, min(cap, base * 2^attempt)). */
export function backoffMs(attempt, random = Math.random) {
  return Math.floor(random() * Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** attempt));
}

export class Connection {
  /**
   * @param {object} o
   * @param {string} o.url the fanout's ws(s):// URL (no token in it, ever)
   * @param {(fresh: boolean) => Promise<string>} o.getToken
   * @param {(frame: object) => void} o.onFrame every server frame, in order
   * @param {(state: string, detail: string) => void} o.onState
   * @param {() => string|null} o.cursor where to resume (the app stores what the frames carried)
   */
  constructor({ url, getToken, onFrame, onState, cursor }) {
    Object.assign(this, { url, getToken, onFrame, onState, cursor });
    this.ws = null;
    this.failures = 0;
    this.timer = null;
    this.refreshTimer = null;
    this.stopped = false;
    this.isLive = false;
    this.freshToken = false;
    window.addEventListener("offline", () => this.goOffline());
    window.addEventListener("online", () => this.reconnectNow());
  }

  start() {
    if (typeof WebSocket === "undefined") {
      this.setState("polling", "WebSocket unavailable: refreshing by polling");
      return;
    }
    this.open();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    clearTimeout(this.refreshTimer);
    if (this.ws) this.ws.close(1000);
  }

  setState(state, detail = "") {
    this.state = state;
    this.onState(state, detail);
  }

  send(message) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN && this.isLive) {
      this.ws.send(JSON.stringify(message));
      return true;
    }
    return false;
  }

  async open() {
    clearTimeout(this.timer);
    if (this.stopped || !navigator.onLine) {
      if (!navigator.onLine) this.setState("offline", "The browser is offline");
      return;
    }
    this.isLive = false;
    this.setState("connecting", this.failures ? `attempt ${this.failures + 1}` : "");
    let token;
    try {
      token = await this.getToken(this.freshToken);
    } catch (err) {
      this.scheduleReconnect(`no token: ${err.message}`);
      return;
    }
    this.freshToken = false;
    const ws = new WebSocket(this.url);
    this.ws = ws;
    let authenticated = false;
    ws.onopen = () => ws.send(JSON.stringify({ type: "auth", token }));
    ws.onmessage = (message) => {
      if (ws !== this.ws) return;
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch {
        return;
      }
      if (frame.type === "authenticated") {
        if (!authenticated) {
          authenticated = true;
          this.setState("syncing", "catching up");
          const subscribe = { type: "subscribe" };
          const cursor = this.cursor();
          if (cursor) subscribe.cursor = cursor;
          ws.send(JSON.stringify(subscribe));
        }
        this.scheduleRefresh(frame.expires_at);
      } else if (frame.type === "live") {
        this.isLive = true;
        this.failures = 0;
        this.setState("live", "");
      }
      this.onFrame(frame);
    };
    ws.onclose = (event) => {
      if (ws !== this.ws) return;
      this.ws = null;
      this.isLive = false;
      clearTimeout(this.refreshTimer);
      if (this.stopped) return;
      if (FATAL_CLOSES.has(event.code)) {
        this.setState("failed", `refused by the server (${event.code} ${event.reason})`);
        return;
      }
      if (event.code === 4401) this.freshToken = true;
      this.scheduleReconnect(event.code === 1000 ? "" : `closed (${event.code})`);
    };
  }

  scheduleReconnect(detail) {
    if (this.stopped) return;
    if (!navigator.onLine) {
      this.setState("offline", "The browser is offline");
      return;
    }
    const delay = backoffMs(this.failures);
    this.failures += 1;
    const polling = this.failures >= FALLBACK_AFTER_FAILURES;
    this.setState(polling ? "polling" : "reconnecting", `${detail} retrying in ${(delay / 1000).toFixed(1)} s`);
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.open(), delay);
  }

  /** Send a fresh token before this one expires (at 80% of its remaining life). */
  scheduleRefresh(expiresAt) {
    clearTimeout(this.refreshTimer);
    if (!expiresAt) return;
    const ms = Math.max(1000, (expiresAt * 1000 - Date.now()) * 0.8);
    this.refreshTimer = setTimeout(async () => {
      try {
        const token = await this.getToken(true);
        if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify({ type: "auth", token }));
      } catch {
        // The next close (4401 on expiry) reconnects with a fresh token.
      }
    }, ms);
  }

  goOffline() {
    clearTimeout(this.timer);
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.close(1000);
    }
    this.isLive = false;
    this.setState("offline", "The browser is offline");
  }

  reconnectNow() {
    if (this.stopped || (this.ws && this.ws.readyState <= WebSocket.OPEN)) return;
    this.failures = 0;
    this.open();
  }
}
