// The console's only way to the server: same-origin fetches to /api/v1 with the session
// cookie (HttpOnly, never readable here). State-changing calls carry the CSRF token that
// GET /auth/session answered. No token is kept in JS-readable storage.

let csrf = null;
let onUnauthorized = null;

export function setCsrf(token) {
  csrf = token || null;
}

export function setUnauthorizedHandler(f) {
  onUnauthorized = f;
}

export class ApiError extends Error {
  constructor(status, body) {
    const msg = (body && typeof body === 'object' && body.message) || (typeof body === 'string' && body) || `HTTP ${status}`;
    super(msg);
    this.status = status;
    this.body = body;
  }
}

export async function api(method, path, body) {
  const headers = { accept: 'application/json' };
  if (body !== undefined) headers['content-type'] = 'application/json';
  if (!['GET', 'HEAD', 'OPTIONS'].includes(method) && csrf) headers['x-csrf-token'] = csrf;
  const r = await fetch(`/api/v1${path}`, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: 'same-origin',
  });
  const text = r.status === 204 ? '' : await r.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = text;
    }
  }
  if (!r.ok) {
    if (r.status === 401 && onUnauthorized && !path.startsWith('/auth/session')) onUnauthorized();
    throw new ApiError(r.status, data);
  }
  return data;
}

export const get = (p) => api('GET', p);
export const post = (p, b) => api('POST', p, b ?? {});
export const put = (p, b) => api('PUT', p, b);
export const patch = (p, b) => api('PATCH', p, b);
export const del = (p) => api('DELETE', p);

export const enc = encodeURIComponent;

// Event stream: /ws/subscribe with the cookie (same origin). Reconnects with backoff; calls
// `onStatus(true|false)` as it connects and drops, and `onEvent(envelope)` for every event.
export function subscribe(types, onEvent, onStatus = () => {}) {
  let ws = null;
  let closed = false;
  let delay = 500;
  let timer = null;
  const open = () => {
    const proto = location.protocol === 'https:' ? 'wss' : 'ws';
    ws = new WebSocket(`${proto}://${location.host}/api/v1/ws/subscribe?event_types=${types.map(enc).join(',')}`);
    ws.onopen = () => {
      delay = 500;
      onStatus(true);
    };
    ws.onmessage = (m) => {
      try {
        onEvent(JSON.parse(m.data));
      } catch {
        /* not an event */
      }
    };
    ws.onclose = () => {
      onStatus(false);
      if (!closed) {
        timer = setTimeout(open, delay);
        delay = Math.min(delay * 2, 10000);
      }
    };
  };
  open();
  return () => {
    closed = true;
    clearTimeout(timer);
    if (ws) ws.close();
  };
}
