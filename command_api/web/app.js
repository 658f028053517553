// The chat page's state and views. State = the query API's answers (loaded with the fanout cursor they
// are exact at) + the fanout's events after that cursor, folded here; see README.md "Web chat page".

import { Api, ApiError, newKey } from "./api.js";
import { Connection } from "./connection.js";
import { el, richText, timeLabel } from "./render.js";

const POLL_MS = 3000;
const TYPING_RESEND_MS = 2000;
const TYPING_IDLE_MS = 3000;
const TYPING_SHOW_MS = 8000;
const PAGE = 50;
const FRESH_FROM_EVENT_MS = 30000;
// A query API without `last_seq` (older than the Client contract): every folded event wins over its rows.
const pageSeq = (answer) => answer.last_seq ?? -1;
const $ = (id) => document.getElementById(id);
const path = (id) => encodeURIComponent(id);

/**
 * Start the page in `document` for the user whose tokens `getToken(fresh)` resolves.
 * @param {{query_url: string, fanout_url: string}} config
 * @param {string} me the user id the tokens name
 * @param {(fresh: boolean) => Promise<string>} getToken
 */
export function mountParley(config, me, getToken) {
  const app = new ChatApp(config, me, getToken);
  app.start();
  return app;
}

class ChatApp {
  constructor(config, me, getToken) {
    this.me = me;
    this.api = new Api({ queryUrl: config.query_url, getToken });
    this.convs = new Map(); // id -> conversation
    this.caches = new Map(); // id -> {bySeq: Map, byId: Map, more: bool, oldest: seq|null}
    this.pending = new Map(); // id -> [{key, message_id, body, reply_to, status, error}]
    this.receipts = new Map(); // id -> Map(user -> up_to_seq)
    this.typing = new Map(); // id -> Map(user -> timer)
    this.presence = new Map(); // user -> {online, last_seen}
    this.cursor = null;
    this.current = null;
    this.folder = "inbox";
    this.composer = { kind: "new", target: null };
    this.confirmDelete = null;
    this.typingSentAt = 0;
    this.typingStop = null;
    this.pollTimer = null;
    this.connection = new Connection({
      url: config.fanout_url,
      getToken,
      cursor: () => this.cursor,
      onFrame: (frame) => this.onFrame(frame),
      onState: (state, detail) => this.onConnectionState(state, detail),
    });
  }

  async start() {
    $("me").textContent = `Signed in as ${this.me}`;
    $("app").hidden = false;
    this.bindUi();
    this.renderConversations();
    await this.loadState(null);
    // Without a cursor from the query API (a server without the state-to-stream handshake), events that
    // land between the load above and the subscribe are missed until the next reload: a known race.
    this.connection.start();
  }

  // ---- state from the query API ----

  async loadState(position) {
    try {
      const items = [];
      let page = null;
      let cursor = null;
      for (let i = 0; i < 5; i++) {
        const answer = await this.api.query("/v1/conversations", { limit: 200, cursor: page }, { cursor: position });
        items.push(...answer.body.conversations);
        cursor = cursor || answer.cursor;
        page = answer.body.next_cursor;
        if (!page) break;
      }
      const fresh = new Map();
      for (const item of items) {
        const conv = {
          id: item.conversation_id, title: item.title, unread: item.unread_count, archived: item.archived,
          activity: Date.parse(item.last_activity_at), lastSeq: item.last_seq,
          unreadSeq: item.last_seq, lastMessageSeq: item.last_message_seq, lastAuthor: item.last_message_author,
          preview: item.last_message_preview, participants: new Set([this.me]),
        };
        const old = this.convs.get(item.conversation_id);
        if (old) this.keepNewer(conv, old);
        fresh.set(item.conversation_id, conv);
      }
      for (const [id, conv] of this.convs) {
        // Read models lag the fanout: a conversation an event just brought stays until they have it.
        if (!fresh.has(id) && conv.fromEventAt > Date.now() - FRESH_FROM_EVENT_MS) fresh.set(id, conv);
      }
      this.convs = fresh;
      if (cursor && !this.cursor) this.cursor = cursor;
      this.renderConversations();
      if (this.current && !this.convs.has(this.current)) this.close();
      if (this.current) await this.loadLatest(this.current);
    } catch (err) {
      this.flash(`Could not load conversations: ${err.message}`);
    }
  }

  /** A loaded row may be older than what the fanout already told: keep whatever is at a later seq. */
  keepNewer(conv, old) {
    conv.participants = old.participants;
    if (old.unreadSeq > conv.unreadSeq) Object.assign(conv, { unread: old.unread, unreadSeq: old.unreadSeq });
    if ((old.lastMessageSeq ?? 0) > (conv.lastMessageSeq ?? 0)) {
      Object.assign(conv, { lastMessageSeq: old.lastMessageSeq, lastAuthor: old.lastAuthor, preview: old.preview });
    }
    conv.activity = Math.max(conv.activity, old.activity || 0);
    conv.lastSeq = Math.max(conv.lastSeq, old.lastSeq || 0);
  }

  cacheOf(id) {
    let cache = this.caches.get(id);
    if (!cache) {
      cache = { bySeq: new Map(), byId: new Map(), overrides: new Map(), more: false, oldest: null, loaded: false };
      this.caches.set(id, cache);
    }
    return cache;
  }

  /**
   * A message as the event of seq `liveSeq` left it, or as a message page exact at `pageSeq` (its
   * `last_seq`) shows it. Every event of a conversation is folded into its cache, opened or not, and the
   * page wins only over what events up to `pageSeq` made (Client contract, step 4): an edit or deletion
   * of a message not yet cached is kept and laid over the page's row when it came after the page.
   */
  putMessage(cache, message, liveSeq, pageSeq = null) {
    if (liveSeq !== null) {
      message.liveSeq = liveSeq;
    } else {
      const known = cache.bySeq.get(message.seq);
      if (known && known.liveSeq > pageSeq) return;
      const later = cache.overrides.get(message.message_id);
      if (later && later.seq > pageSeq) Object.assign(message, later.change, { liveSeq: later.seq });
    }
    cache.bySeq.set(message.seq, message);
    cache.byId.set(message.message_id, message.seq);
  }

  /** The latest page of a conversation merged into its cache. */
  async loadLatest(id, token = null) {
    const cache = this.cacheOf(id);
    try {
      const answer = await this.api.query(`/v1/conversations/${path(id)}/messages`, { limit: PAGE },
        { token, cursor: this.cursor });
      for (const m of answer.body.messages) {
        this.putMessage(cache, m, null, pageSeq(answer.body));
        this.noteParticipant(id, m.author);
      }
      if (!cache.loaded) {
        cache.more = answer.body.next_before_seq !== null;
        cache.oldest = answer.body.messages.length ? answer.body.messages.at(-1).seq : null;
      }
      cache.loaded = true;
    } catch (err) {
      // A 404 here is a read model that has not caught up (a removal closes the view when its event comes).
      this.flash(`Could not load messages: ${err.message}`);
    }
    if (id === this.current) this.renderMessages({ stick: true });
  }

  async loadOlder() {
    const id = this.current;
    const cache = this.cacheOf(id);
    if (!cache.more || cache.oldest === null) return;
    try {
      const answer = await this.api.query(`/v1/conversations/${path(id)}/messages`,
        { limit: PAGE, before_seq: cache.oldest });
      for (const m of answer.body.messages) this.putMessage(cache, m, null, pageSeq(answer.body));
      cache.more = answer.body.next_before_seq !== null;
      if (answer.body.messages.length) cache.oldest = answer.body.messages.at(-1).seq;
    } catch (err) {
      this.flash(`Could not load older messages: ${err.message}`);
    }
    if (id === this.current) this.renderMessages({ keepFromBottom: true });
  }

  // ---- the fanout's frames ----

  onFrame(frame) {
    switch (frame.type) {
      case "event":
        this.apply(frame.event);
        this.cursor = frame.cursor;
        break;
      case "events":
        for (const event of frame.events) this.apply(event);
        this.cursor = frame.cursor;
        break;
      case "live":
        this.cursor = frame.cursor;
        // A resumed subscription gets no `unread` frame for events the fanout's own seed already counts
        // (those up to the read models' checkpoint when it subscribed): the counts' baseline is reloaded
        // after each (re)subscribe, and frames it already covers are dropped.
        this.reloadSoon();
        break;
      case "resync":
        this.cursor = frame.position;
        this.caches.clear();
        this.loadState(frame.position);
        break;
      case "unread": {
        const conv = this.convs.get(frame.conversation_id);
        if (!conv) {
          this.reloadSoon();
          break;
        }
        if (frame.seq <= conv.unreadSeq) break; // the loaded count already includes that event
        Object.assign(conv, { unread: frame.unread, unreadSeq: frame.seq, readSeq: frame.read_seq });
        this.renderConversations();
        if (conv.id === this.current && conv.unread) this.markReadSoon();
        break;
      }
      case "read":
        this.noteReceipt(frame.conversation_id, frame.user_id, frame.up_to_seq);
        break;
      case "typing":
        this.noteTyping(frame.conversation_id, frame.user_id, frame.state === "start");
        break;
      case "presence":
        this.presence.set(frame.user_id, { online: frame.online, last_seen: frame.last_seen });
        this.renderPresence();
        break;
      case "presence_snapshot":
        this.presence = new Map(frame.users.map((u) => [u.user_id, u]));
        this.renderPresence();
        break;
      case "error":
        this.flash(`Server: ${frame.reason} ${frame.detail || ""}`);
        break;
      default:
        break;
    }
  }

  /** Fold one event: idempotent, so events at or before a loaded state change nothing twice. */
  apply(event) {
    const id = event.conversation_id;
    const p = event.payload;
    const at = Date.parse(event.occurred_at);
    let conv = this.convs.get(id);
    if (p.type === "conversation_created" && !conv) {
      conv = this.added(id, p.title, at, event.seq, p.participants);
    }
    if (!conv && p.type === "participant_added" && p.user_id === this.me) {
      // Added to a conversation that began before: its title and state come from the query API.
      conv = this.added(id, id, at, event.seq, [event.actor, this.me]);
      this.reloadSoon();
    }
    if (!conv) return;
    conv.lastSeq = Math.max(conv.lastSeq || 0, event.seq);
    const cache = this.cacheOf(id);
    switch (p.type) {
      case "conversation_created":
        conv.participants = new Set(p.participants);
        break;
      case "participant_added":
        conv.participants.add(p.user_id);
        break;
      case "participant_removed":
        conv.participants.delete(p.user_id);
        if (p.user_id === this.me) {
          this.convs.delete(id);
          this.caches.delete(id);
          if (this.current === id) this.close();
        }
        break;
      case "message_sent":
        this.noteParticipant(id, event.actor);
        if (event.seq >= (conv.lastMessageSeq || 0)) {
          Object.assign(conv, { lastMessageSeq: event.seq, lastAuthor: event.actor, preview: p.body.slice(0, 140) });
        }
        conv.activity = Math.max(conv.activity || 0, at);
        this.putMessage(cache, {
          conversation_id: id, seq: event.seq, message_id: p.message_id, author: event.actor, body: p.body,
          state: "sent", reply_to: p.reply_to ?? null, sent_at: event.occurred_at, edited_at: null,
        }, event.seq);
        this.settlePending(id, p.message_id);
        this.noteTyping(id, event.actor, false);
        break;
      case "message_edited":
      case "message_deleted": {
        const seq = cache.byId.get(p.message_id);
        const deleted = p.type === "message_deleted";
        const change = deleted ? { body: null, state: "deleted" } : { body: p.body, state: "edited", edited_at: event.occurred_at };
        if (seq !== undefined) this.putMessage(cache, { ...cache.bySeq.get(seq), ...change }, event.seq);
        else cache.overrides.set(p.message_id, { change, seq: event.seq });
        if (conv.lastMessageSeq !== null && (seq === conv.lastMessageSeq || seq === undefined)) {
          // Without the message cached the preview is refreshed from the query API.
          if (seq === undefined) this.reloadSoon();
          else conv.preview = deleted ? null : p.body.slice(0, 140);
        }
        break;
      }
      case "messages_read":
        this.noteReceipt(id, event.actor, p.up_to_seq);
        break;
      case "conversation_archived":
        conv.archived = true;
        break;
      case "conversation_unarchived":
        conv.archived = false;
        break;
      default:
        break;
    }
    this.renderConversations();
    if (id === this.current) {
      this.renderMessages();
      this.renderHeader();
      this.markReadSoon();
    }
  }

  /** A conversation the page learnt of before the query API has it. */
  added(id, title, at, seq, participants) {
    const conv = {
      id, title, unread: 0, unreadSeq: 0, archived: false, activity: at, lastSeq: seq, lastMessageSeq: null,
      lastAuthor: null, preview: null, participants: new Set(participants), fromEventAt: Date.now(),
    };
    this.convs.set(id, conv);
    return conv;
  }

  noteParticipant(id, user) {
    const conv = this.convs.get(id);
    if (conv && user) conv.participants.add(user);
  }

  noteReceipt(id, user, upTo) {
    if (user === this.me) return;
    let markers = this.receipts.get(id);
    if (!markers) this.receipts.set(id, (markers = new Map()));
    markers.set(user, Math.max(markers.get(user) || 0, upTo));
    this.noteParticipant(id, user);
    if (id === this.current) this.renderMessages();
  }

  noteTyping(id, user, on) {
    let users = this.typing.get(id);
    if (!users) this.typing.set(id, (users = new Map()));
    clearTimeout(users.get(user));
    if (on) users.set(user, setTimeout(() => this.noteTyping(id, user, false), TYPING_SHOW_MS));
    else users.delete(user);
    if (id === this.current) this.renderTyping();
  }

  reloadSoon() {
    clearTimeout(this.reloadTimer);
    this.reloadTimer = setTimeout(() => this.loadState(this.cursor), 200);
  }

  onConnectionState(state, detail) {
    const labels = {
      connecting: "Connecting…", syncing: "Catching up…", live: "Live", reconnecting: "Reconnecting…",
      offline: "Offline", polling: "Live updates unavailable: refreshing every 3 s", failed: "Disconnected",
    };
    const node = $("connection");
    node.dataset.state = state;
    node.textContent = labels[state] || state;
    node.title = detail;
    if (state === "polling") this.startPolling();
    if (state === "live") this.stopPolling();
  }

  /** The REST fallback: while the WebSocket cannot be had, poll the query API. */
  startPolling() {
    if (this.pollTimer) return;
    const poll = async () => {
      await this.loadState(null);
      this.pollTimer = setTimeout(poll, POLL_MS);
    };
    this.pollTimer = setTimeout(poll, 0);
  }

  stopPolling() {
    clearTimeout(this.pollTimer);
    this.pollTimer = null;
  }

  // ---- commands ----

  async send(body) {
    const id = this.current;
    if (this.composer.kind === "edit") {
      const target = this.composer.target;
      this.resetComposer();
      await this.run(() => this.api.command("PATCH", `/v1/conversations/${path(id)}/messages/${path(target.message_id)}`, { body }));
      return;
    }
    const item = {
      key: newKey(), message_id: newKey(), body, status: "sending",
      reply_to: this.composer.kind === "reply" ? this.composer.target.message_id : null,
    };
    this.resetComposer();
    if (!this.pending.has(id)) this.pending.set(id, []);
    this.pending.get(id).push(item);
    this.renderMessages({ stick: true });
    // One send at a time per page, so messages keep the order they were written in.
    this.outbox = (this.outbox || Promise.resolve()).then(() => this.deliver(id, item));
    await this.outbox;
  }

  async deliver(id, item) {
    item.status = "sending";
    const payload = { body: item.body, message_id: item.message_id };
    if (item.reply_to) payload.reply_to = item.reply_to;
    try {
      const answer = await this.api.command("POST", `/v1/conversations/${path(id)}/messages`, payload, item.key);
      const cache = this.caches.get(id);
      if (cache && !cache.bySeq.has(answer.body.seq)) {
        this.putMessage(cache, {
          conversation_id: id, seq: answer.body.seq, message_id: item.message_id, author: this.me,
          body: item.body, state: "sent", reply_to: item.reply_to, sent_at: new Date().toISOString(),
        }, answer.body.seq);
      }
      this.settlePending(id, item.message_id);
    } catch (err) {
      item.status = "failed";
      item.error = err.message;
    }
    if (id === this.current) this.renderMessages({ stick: true });
  }

  settlePending(id, messageId) {
    const items = this.pending.get(id);
    if (!items) return;
    const left = items.filter((item) => item.message_id !== messageId);
    if (left.length !== items.length) this.pending.set(id, left);
  }

  async run(action, errorNode = null) {
    try {
      return await action();
    } catch (err) {
      const message = err instanceof ApiError ? `${err.message} (${err.slug})` : err.message;
      if (errorNode) errorNode.textContent = message;
      else this.flash(message);
      return null;
    }
  }

  markReadSoon() {
    clearTimeout(this.readTimer);
    this.readTimer = setTimeout(() => this.markRead(), 150);
  }

  async markRead() {
    const conv = this.convs.get(this.current);
    if (!conv || !conv.unread || document.visibilityState !== "visible") return;
    const upTo = conv.lastSeq;
    try {
      await this.api.command("POST", `/v1/conversations/${path(conv.id)}/read`, { up_to_seq: upTo });
      if (this.connection.state !== "live") {
        conv.unread = 0;
        this.renderConversations();
      }
    } catch (err) {
      if (!(err instanceof ApiError) || err.status >= 500) this.flash(`Could not mark read: ${err.message}`);
    }
  }

  sendTyping(on) {
    if (!this.current) return;
    this.connection.send({ type: "typing", conversation_id: this.current, state: on ? "start" : "stop" });
  }

  onComposerInput() {
    const now = Date.now();
    if (now - this.typingSentAt > TYPING_RESEND_MS) {
      this.typingSentAt = now;
      this.sendTyping(true);
    }
    clearTimeout(this.typingStop);
    this.typingStop = setTimeout(() => this.stopTyping(), TYPING_IDLE_MS);
  }

  stopTyping() {
    clearTimeout(this.typingStop);
    if (this.typingSentAt) this.sendTyping(false);
    this.typingSentAt = 0;
  }

  // ---- navigation ----

  /** Show conversation `id`; `token` (a command's position_token) makes its messages at least that fresh. */
  open(id, token = null) {
    if (this.current && this.current !== id) this.stopTyping();
    this.current = id;
    this.confirmDelete = null;
    this.resetComposer();
    document.body.classList.add("show-conversation");
    $("conversation").hidden = false;
    $("empty").hidden = true;
    this.renderHeader();
    this.renderConversations();
    this.renderMessages({ stick: true });
    this.renderTyping();
    this.loadLatest(id, token).then(() => this.markReadSoon());
    $("composer-input").focus();
  }

  close() {
    this.stopTyping();
    this.current = null;
    document.body.classList.remove("show-conversation");
    $("conversation").hidden = true;
    $("empty").hidden = false;
    this.renderConversations();
  }

  resetComposer() {
    this.composer = { kind: "new", target: null };
    $("composer-input").value = "";
    $("composer-context").hidden = true;
  }

  setComposer(kind, message) {
    this.composer = { kind, target: message };
    $("composer-context").hidden = false;
    $("composer-context-text").textContent = kind === "edit"
      ? "Editing your message" : `Replying to ${message.author}: ${(message.body || "").slice(0, 80)}`;
    if (kind === "edit") $("composer-input").value = message.body;
    $("composer-input").focus();
  }

  /** A problem the user should know of, shown for a few seconds. */
  flash(text) {
    const node = $("notice");
    node.textContent = text;
    node.hidden = false;
    clearTimeout(this.noticeTimer);
    this.noticeTimer = setTimeout(() => { node.hidden = true; }, 6000);
  }

  // ---- views ----

  bindUi() {
    $("composer").addEventListener("submit", (e) => {
      e.preventDefault();
      const body = $("composer-input").value.trim();
      if (!body || !this.current) return;
      this.stopTyping();
      this.send(body);
    });
    $("composer-input").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        $("composer").requestSubmit();
      } else if (e.key === "Escape") {
        this.resetComposer();
      }
    });
    $("composer-input").addEventListener("input", () => this.onComposerInput());
    $("composer-cancel").addEventListener("click", () => this.resetComposer());
    $("back").addEventListener("click", () => this.close());
    $("older").addEventListener("click", () => this.loadOlder());
    $("messages").addEventListener("scroll", () => {
      if ($("messages").scrollTop === 0 && this.current && this.cacheOf(this.current).more) this.loadOlder();
    });
    for (const folder of ["inbox", "archived"]) {
      $(`tab-${folder}`).addEventListener("click", () => {
        this.folder = folder;
        $("tab-inbox").setAttribute("aria-selected", String(folder === "inbox"));
        $("tab-archived").setAttribute("aria-selected", String(folder === "archived"));
        this.renderConversations();
      });
    }
    $("archive-toggle").addEventListener("click", () => {
      const conv = this.convs.get(this.current);
      if (!conv) return;
      this.run(() => this.api.command(conv.archived ? "DELETE" : "PUT", `/v1/conversations/${path(conv.id)}/archive`));
    });
    $("create-form").addEventListener("submit", async (e) => {
      e.preventDefault();
      $("create-error").textContent = "";
      const title = $("create-title").value.trim();
      const participants = $("create-people").value.split(",").map((s) => s.trim()).filter(Boolean);
      const answer = await this.run(
        () => this.api.command("POST", "/v1/conversations", { title, participants }), $("create-error"));
      if (!answer) return;
      const id = answer.body.conversation_id;
      if (!this.convs.has(id)) this.added(id, title, Date.now(), answer.body.seq, [this.me, ...participants]);
      $("create-title").value = "";
      $("create-people").value = "";
      e.target.closest("details").open = false;
      this.open(id, answer.body.position_token);
    });
    $("add-form").addEventListener("submit", async (e) => {
      e.preventDefault();
      $("participants-error").textContent = "";
      const user = $("add-user").value.trim();
      const ok = await this.run(() => this.api.command("POST", `/v1/conversations/${path(this.current)}/participants`,
        { user_id: user }), $("participants-error"));
      if (ok) $("add-user").value = "";
    });
    $("search-form").addEventListener("submit", async (e) => {
      e.preventDefault();
      const q = $("search-q").value.trim();
      const box = $("search-results");
      if (!q) {
        box.hidden = true;
        return;
      }
      const answer = await this.run(() => this.api.query("/v1/search", { q, limit: 20 }));
      if (answer) this.renderSearch(answer.body.messages);
    });
    document.addEventListener("visibilitychange", () => this.markReadSoon());
  }

  renderConversations() {
    const list = $("conversations");
    const archived = this.folder === "archived";
    const convs = [...this.convs.values()].filter((c) => Boolean(c.archived) === archived)
      .sort((a, b) => (b.activity - a.activity) || (b.id < a.id ? -1 : 1));
    list.replaceChildren(...convs.map((c) => {
      const preview = c.lastMessageSeq === null ? "No messages yet"
        : c.preview === null ? `${c.lastAuthor}: message deleted` : `${c.lastAuthor}: ${c.preview}`;
      const badge = el("span", { cls: "unread", text: String(c.unread || 0),
        attrs: { "aria-label": `${c.unread || 0} unread` } });
      badge.hidden = !c.unread;
      const button = el("button", {
        cls: "conversation-item", attrs: { "data-conversation-id": c.id, "aria-current": String(c.id === this.current) },
        children: [el("span", { cls: "title", text: c.title }), badge, el("span", { cls: "preview", text: preview })],
        on: { click: () => this.open(c.id) },
      });
      return el("li", { children: [button] });
    }));
    if (!convs.length) list.append(el("li", { cls: "none", text: archived ? "Nothing archived" : "No conversations yet" }));
  }

  renderHeader() {
    const conv = this.convs.get(this.current);
    if (!conv) return;
    $("conv-title").textContent = conv.title;
    $("archive-toggle").textContent = conv.archived ? "Unarchive" : "Archive";
    const people = [...conv.participants].sort();
    $("participants").replaceChildren(...people.map((user) => el("li", {
      children: [
        this.presenceDot(user), el("span", { text: user === this.me ? `${user} (you)` : user }),
        el("button", {
          text: user === this.me ? "Leave" : "Remove", attrs: { "aria-label": `Remove ${user}` },
          on: { click: () => this.run(() => this.api.command("DELETE",
            `/v1/conversations/${path(conv.id)}/participants/${path(user)}`), $("participants-error")) },
        }),
      ],
    })));
  }

  presenceDot(user) {
    const p = this.presence.get(user);
    const online = user === this.me || Boolean(p && p.online);
    return el("span", { cls: online ? "dot online" : "dot", attrs: { "aria-label": online ? "online" : "offline" } });
  }

  renderPresence() {
    const users = [...this.presence.entries()].sort(([a], [b]) => (a < b ? -1 : 1));
    $("presence").replaceChildren(...users.map(([user, p]) => el("li", {
      attrs: { "data-user": user, "data-online": String(Boolean(p.online)) },
      children: [this.presenceDot(user), el("span", { text: user }),
        el("span", { cls: "seen", text: p.online ? " online" : p.last_seen ? ` last seen ${timeLabel(new Date(p.last_seen * 1000).toISOString())}` : " offline" })],
    })));
    if (this.current) this.renderHeader();
  }

  renderTyping() {
    const users = [...(this.typing.get(this.current) || new Map()).keys()].filter((u) => u !== this.me);
    $("typing").textContent = users.length ? `${users.join(", ")} ${users.length > 1 ? "are" : "is"} typing…` : "";
  }

  renderMessages({ stick = false, keepFromBottom = false } = {}) {
    const box = $("messages");
    const fromBottom = box.scrollHeight - box.scrollTop;
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    const cache = this.cacheOf(this.current);
    const messages = [...cache.bySeq.values()].sort((a, b) => a.seq - b.seq);
    const readers = new Map(); // seq -> [user]
    for (const [user, upTo] of this.receipts.get(this.current) || []) {
      const last = messages.filter((m) => m.seq <= upTo).at(-1);
      if (last) readers.set(last.seq, [...(readers.get(last.seq) || []), user]);
    }
    const nodes = messages.map((m) => this.messageNode(m, cache, readers.get(m.seq)));
    for (const item of this.pending.get(this.current) || []) nodes.push(this.pendingNode(item));
    $("message-list").replaceChildren(...nodes);
    $("older").hidden = !cache.more;
    if (keepFromBottom) box.scrollTop = box.scrollHeight - fromBottom;
    else if (stick || atBottom) box.scrollTop = box.scrollHeight;
  }

  messageNode(m, cache, readers) {
    const mine = m.author === this.me;
    const deleted = m.state === "deleted";
    const children = [];
    if (m.reply_to) {
      const target = cache.bySeq.get(cache.byId.get(m.reply_to));
      const quoted = !target ? "an earlier message" : target.state === "deleted" ? `${target.author}: message deleted`
        : `${target.author}: ${(target.body || "").slice(0, 80)}`;
      children.push(el("p", { cls: "quote", text: `↪ ${quoted}` }));
    }
    children.push(el("p", { cls: "meta", children: [
      el("span", { cls: "author", text: m.author }), el("time", { text: timeLabel(m.sent_at), attrs: { datetime: m.sent_at } }),
      m.state === "edited" ? el("span", { cls: "edited", text: "(edited)" }) : null,
    ] }));
    const body = el("p", { cls: deleted ? "body deleted" : "body" });
    if (deleted) body.textContent = "message deleted";
    else body.append(richText(m.body || ""));
    children.push(body);
    if (!deleted) {
      const actions = [el("button", { text: "Reply", on: { click: () => this.setComposer("reply", m) } })];
      if (mine) {
        actions.push(el("button", { text: "Edit", on: { click: () => this.setComposer("edit", m) } }));
        const confirming = this.confirmDelete === m.message_id;
        actions.push(el("button", { text: confirming ? "Confirm delete" : "Delete", cls: confirming ? "danger" : "", on: {
          click: () => {
            if (!confirming) {
              this.confirmDelete = m.message_id;
              this.renderMessages();
              return;
            }
            this.confirmDelete = null;
            this.run(() => this.api.command("DELETE", `/v1/conversations/${path(m.conversation_id)}/messages/${path(m.message_id)}`));
          },
        } }));
      }
      children.push(el("p", { cls: "actions", children: actions }));
    }
    if (readers) children.push(el("p", { cls: "receipt", text: `Seen by ${readers.sort().join(", ")}` }));
    return el("li", { cls: mine ? "message mine" : "message", children,
      attrs: { "data-seq": String(m.seq), "data-message-id": m.message_id, "data-state": m.state } });
  }

  pendingNode(item) {
    const children = [
      el("p", { cls: "meta", children: [el("span", { cls: "author", text: this.me }),
        el("span", { cls: "status", text: item.status === "failed" ? `not sent: ${item.error}` : "sending…" })] }),
      el("p", { cls: "body", children: [richText(item.body)] }),
    ];
    if (item.status === "failed") {
      children.push(el("p", { cls: "actions", children: [
        el("button", { text: "Retry", on: { click: () => { this.deliver(this.current, item); this.renderMessages(); } } }),
        el("button", { text: "Discard", on: { click: () => { this.settlePending(this.current, item.message_id); this.renderMessages(); } } }),
      ] }));
    }
    return el("li", { cls: `message mine pending ${item.status}`, children, attrs: { "data-message-id": item.message_id } });
  }

  renderSearch(messages) {
    const box = $("search-results");
    box.hidden = false;
    const close = el("button", { text: "Close results", on: { click: () => { box.hidden = true; } } });
    const items = messages.map((m) => {
      const conv = this.convs.get(m.conversation_id);
      return el("li", { children: [el("button", {
        cls: "search-hit", on: { click: () => this.open(m.conversation_id) },
        children: [el("span", { cls: "title", text: conv ? conv.title : m.conversation_id }),
          el("span", { cls: "preview", text: `${m.author}: ${m.body || "message deleted"}` })],
      })] });
    });
    box.replaceChildren(el("h2", { text: `${messages.length} result${messages.length === 1 ? "" : "s"}` }),
      el("ul", { children: items }), close);
  }
}
