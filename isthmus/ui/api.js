// The API client. The token lives in this tab's sessionStorage only: no cookies, so no CSRF;
// it leaves the page only as the bearer header of calls to this origin.
const KEY = "isthmus.token";

export class ApiError extends Error {
  constructor(status, message, field) {
    super(message);
    this.status = status;
    this.field = field;
  }
}

export const session = {
  get token() {
    return sessionStorage.getItem(KEY);
  },
  set token(value) {
    if (value) sessionStorage.setItem(KEY, value);
    else sessionStorage.removeItem(KEY);
  },
  skew: 0, // the server's clock minus ours, in ms (from the Date header)
  onUnauthorized: () => {},
};

/** Call the API; resolves to {status, body, index}. Throws ApiError for 4xx/5xx. */
export async function api(path, { method = "GET", body, signal } = {}) {
  const headers = { Authorization: `Bearer ${session.token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
    cache: "no-store",
    credentials: "omit",
    redirect: "error",
  });
  const date = Date.parse(r.headers.get("Date") || "");
  if (!Number.isNaN(date)) session.skew = date - Date.now();
  const text = await r.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = { error: text.slice(0, 200) };
    }
  }
  if (r.status === 401) session.onUnauthorized();
  if (!r.ok) throw new ApiError(r.status, (data && data.error) || r.statusText, data && data.field);
  const index = r.headers.get("X-Isthmus-Index");
  return { status: r.status, body: data, index: index === null ? null : Number(index) };
}

/**
 * Follow a blocking query: call `path?index=N&wait=W` again and again, handing every answer
 * to `onData`. Returns a stop function. Errors back off (1 s, doubling to 30 s).
 */
export function follow(path, onData, { wait = "30s" } = {}) {
  let index = null; // null: the next call does not block (first call, or after a restart)
  let stopped = false;
  let delay = 1000;
  const controller = new AbortController();
  const sep = path.includes("?") ? "&" : "?";
  const pause = (ms) => new Promise((r) => setTimeout(r, ms));
  (async () => {
    while (!stopped) {
      try {
        const url = index === null ? path : `${path}${sep}index=${index}&wait=${wait}`;
        const asked = index;
        const began = Date.now();
        const res = await api(url, { signal: controller.signal });
        if (stopped) return;
        // An index that went back means the appliance restarted: ask again without blocking.
        const back = res.index === null || (index !== null && res.index < index);
        index = back ? null : res.index;
        delay = 1000;
        onData(res.body, res.index);
        if (res.index === null) await pause(30000); // a route that cannot block: no busy loop
        // the same index back at once: the route did not block; never turn that into a loop
        else if (res.index === asked && Date.now() - began < 500) await pause(5000);
      } catch (e) {
        if (stopped || e.name === "AbortError") return;
        if (e.status === 401 || e.status === 403) return;
        await pause(delay);
        delay = Math.min(delay * 2, 30000);
      }
    }
  })();
  return () => {
    stopped = true;
    controller.abort();
  };
}
