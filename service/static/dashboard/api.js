// The dashboard's only source of data: the API's JSON endpoints, called with the key
// this tab was given (sessionStorage) or with none when the server has keys off.

const KEY = "posttrain.apiKey";
const API = new URL("../v1/", document.baseURI);

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function storedKey() {
  return sessionStorage.getItem(KEY);
}

export function saveKey(key) {
  sessionStorage.setItem(KEY, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY);
}

export function url(path, params = {}) {
  const out = new URL(path.replace(/^\//, ""), API);
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null) out.searchParams.set(name, String(value));
  }
  return out;
}

function headers(key) {
  const out = { Accept: "application/json" };
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

async function failure(resp) {
  const body = await resp.json().catch(() => null);
  const err = (body && body.error) || {};
  return new ApiError(resp.status, err.message || `${resp.status} ${resp.statusText}`, err.code);
}

export async function get(path, params = {}, key = storedKey()) {
  const resp = await fetch(url(path, params), { headers: headers(key), cache: "no-store" });
  if (!resp.ok) throw await failure(resp);
  return resp.json();
}

// Every page of a list endpoint that pages with `after` = the last id (or `cursor(page)`).
export async function allPages(path, params, cursor = (page) => page.last_id, maxPages = 50) {
  const rows = [];
  let after = params.after;
  for (let i = 0; i < maxPages; i++) {
    const page = await get(path, { ...params, after });
    rows.push(...page.data);
    if (!page.has_more || !page.data.length) break;
    after = cursor(page);
  }
  return rows;
}

// Save a file the API streams. Without a key the browser downloads it itself (streamed to
// disk); with one, a link cannot send the header, so it is fetched here and handed over.
export async function download(link) {
  const key = storedKey();
  const resp = await fetch(link.href, { headers: headers(key) });
  if (!resp.ok) throw await failure(resp);
  const blob = await resp.blob();
  const href = URL.createObjectURL(blob);
  const save = document.createElement("a");
  save.href = href;
  save.download = link.getAttribute("download") || "download";
  document.body.appendChild(save);
  save.click();
  save.remove();
  setTimeout(() => URL.revokeObjectURL(href), 60_000);
}

// Errors reach the page through events, so views need not know about the login form.
export function report(err) {
  const name = err instanceof ApiError && err.status === 401 ? "posttrain-unauthorized" : "posttrain-error";
  window.dispatchEvent(new CustomEvent(name, { detail: err }));
}

// Run `fn` now and every `ms` until it returns false or the poller is stopped. A 401 (the
// login form takes over) or a 404 (the record is not the tenant's, or gone) stops it;
// other errors are shown and polling goes on.
export function poll(fn, ms) {
  let timer = null;
  let stopped = false;
  const tick = async () => {
    let again = true;
    try {
      again = await fn();
    } catch (err) {
      report(err);
      if (err instanceof ApiError && (err.status === 401 || err.status === 404)) again = false;
    }
    if (!stopped && again !== false) timer = setTimeout(tick, ms);
  };
  tick();
  return {
    stop() {
      stopped = true;
      clearTimeout(timer);
    },
  };
}
