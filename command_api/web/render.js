// Safe rendering: every user-supplied string reaches the DOM through textContent or an attribute set
// by the DOM API, never as HTML; only http(s) URLs become links.

const URL_PATTERN = /\bhttps?:\/\/[^\s<>"']+/gi;
const SAFE_PROTOCOLS = new Set(["http:", "https:"]);

/** Text with http(s) URLs as links; everything else (`javascript:` included) stays text. */
export function richText(text) {
  const fragment = document.createDocumentFragment();
  let last = 0;
  for (const match of text.matchAll(URL_PATTERN)) {
    const raw = match[0].replace(/[.,;:!?)\]]+$/, "");
    let url = null;
    try {
      url = new URL(raw);
    } catch {
      url = null;
    }
    if (!url || !SAFE_PROTOCOLS.has(url.protocol)) continue;
    fragment.append(text.slice(last, match.index));
    const link = el("a", { text: raw });
    link.href = url.href;
    link.rel = "noopener noreferrer nofollow";
    link.target = "_blank";
    fragment.append(link);
    last = match.index + raw.length;
  }
  fragment.append(text.slice(last));
  return fragment;
}

/** An element with text content, class names, attributes and children: no HTML parsing anywhere. */
export function el(tag, { text, cls, attrs, children, on } = {}) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (cls) node.className = cls;
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  for (const child of children || []) if (child) node.append(child);
  for (const [name, handler] of Object.entries(on || {})) node.addEventListener(name, handler);
  return node;
}

export function timeLabel(iso) {
  if (!iso) return "";
  const when = new Date(iso);
  const sameDay = when.toDateString() === new Date().toDateString();
  return sameDay
    ? when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : when.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}
