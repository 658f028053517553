// Where the page's tokens come from. Dev mode: a name, minted into a dev token by POST /dev/token.
// Production: the host application gives them, either (same origin) by setting
// `window.parleyTokenProvider = async (fresh) => token` before this module runs, or (the page in an
// iframe) by answering `{type: "parley-token-request"}` messages with `{type: "parley-token", token}`
// from an origin listed in PARLEY_WEB_FRAME_ANCESTORS. Tokens live in memory only, never in a URL.

import { mountParley } from "./app.js";

const $ = (id) => document.getElementById(id);

function claims(token) {
  const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
  return JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "=")));
}

/** A provider that caches one token and asks `mint` again when it is stale or `fresh` is asked. */
function caching(mint) {
  let token = null;
  return async (fresh = false) => {
    if (!token || fresh || claims(token).exp * 1000 - Date.now() < 30000) token = await mint();
    return token;
  };
}

async function devToken(name) {
  const response = await fetch("/dev/token", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ user_id: name }),
  });
  const body = await response.json();
  if (!response.ok) throw new Error(body.detail || body.title);
  return body.token;
}

function fromParent(origins) {
  return () => new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("the host application sent no token")), 10000);
    window.addEventListener("message", function answer(event) {
      if (!origins.includes(event.origin) || !event.data || event.data.type !== "parley-token") return;
      window.removeEventListener("message", answer);
      clearTimeout(timer);
      resolve(String(event.data.token));
    });
    for (const origin of origins) window.parent.postMessage({ type: "parley-token-request" }, origin);
  });
}

async function start(config, getToken) {
  const token = await getToken(false);
  $("login").hidden = true;
  $("waiting").hidden = true;
  mountParley(config, claims(token).sub, getToken);
}

async function boot() {
  const config = await (await fetch("/web/config.json")).json();
  if (typeof window.parleyTokenProvider === "function") {
    await start(config, caching(() => window.parleyTokenProvider(true)));
    return;
  }
  if (window.parent !== window && config.embed_origins.length) {
    $("waiting").hidden = false;
    await start(config, caching(fromParent(config.embed_origins)));
    return;
  }
  if (!config.dev_mode) {
    $("waiting").hidden = false;
    $("waiting").textContent = "No token: embed this page in an application that provides one (see README).";
    return;
  }
  $("login").hidden = false;
  const saved = sessionStorage.getItem("parley-user");
  if (saved) $("login-name").value = saved;
  $("login-name").focus();
  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = $("login-name").value.trim();
    $("login-error").textContent = "";
    const getToken = caching(() => devToken(name));
    try {
      await start(config, getToken);
      sessionStorage.setItem("parley-user", name);
    } catch (err) {
      $("login-error").textContent = err.message;
    }
  });
}

boot();
