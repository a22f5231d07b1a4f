import { useCallback, useEffect, useRef, useState } from 'preact/hooks';
import { get, subscribe } from './api.js';

// Data from one GET, with reload; `path` null means "do not load".
export function useData(path) {
  const [state, setState] = useState({ data: null, error: null, loading: !!path });
  const seq = useRef(0);
  const reload = useCallback(async () => {
    if (!path) return;
    const n = ++seq.current;
    try {
      const data = await get(path);
      if (n === seq.current) setState({ data, error: null, loading: false });
    } catch (error) {
      if (n === seq.current) setState((s) => ({ data: s.data, error, loading: false }));
    }
  }, [path]);
  useEffect(() => {
    setState({ data: null, error: null, loading: !!path });
    reload();
  }, [reload]);
  return { ...state, reload };
}

// Reload when events of `types` arrive (at most every 300 ms); answers whether the stream is up.
export function useLive(types, reload, filter = () => true) {
  const [live, setLive] = useState(false);
  const pending = useRef(null);
  const latest = useRef(reload);
  latest.current = reload;
  const key = types.join(',');
  useEffect(() => {
    if (!types.length) return undefined;
    const stop = subscribe(
      types,
      (ev) => {
        if (!filter(ev) || pending.current) return;
        pending.current = setTimeout(() => {
          pending.current = null;
          latest.current();
        }, 300);
      },
      (up) => {
        setLive(up);
        if (up) latest.current();
      },
    );
    return () => {
      stop();
      clearTimeout(pending.current);
      pending.current = null;
    };
  }, [key]);
  return live;
}

export function ErrorBox({ error }) {
  if (!error) return null;
  return (
    <p class="error" role="alert">
      {error.message}
      {error.status ? ` (HTTP ${error.status})` : ''}
    </p>
  );
}

export function Badge({ kind = 'neutral', children }) {
  return <span class={`badge badge-${kind}`}>{children}</span>;
}

export function stateKind(s) {
  const v = String(s || '').toLowerCase();
  if (['running', 'healthy', 'completed', 'enabled', 'active'].includes(v)) return 'ok';
  if (['stopped', 'suspended', 'paused', 'disabled', 'pending', 'degraded'].includes(v)) return 'warn';
  if (['failed', 'unhealthy', 'error', 'unreachable', 'revoked', 'tainted'].includes(v)) return 'bad';
  return 'neutral';
}

export function StateBadge({ state }) {
  return <Badge kind={stateKind(state)}>{state || 'unknown'}</Badge>;
}

// A table that scrolls sideways on narrow screens; `cols`: [{key, label, render?}].
export function Table({ cols, rows, empty = 'Nothing here yet.', rowKey = (r) => r.id, label }) {
  if (!rows || rows.length === 0) return <p class="muted">{empty}</p>;
  return (
    <div class="table-wrap" tabIndex={0} role="region" aria-label={label}>
      <table>
        <thead>
          <tr>
            {cols.map((c) => (
              <th scope="col" key={c.key}>
                {c.label}
              </th>
            ))}
          </tr>
        </thead>
        <tbody>
          {rows.map((r) => (
            <tr key={rowKey(r)} data-row={rowKey(r)}>
              {cols.map((c) => (
                <td key={c.key} data-label={c.label}>
                  {c.render ? c.render(r) : String(r[c.key] ?? '')}
                </td>
              ))}
            </tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}

// A modal dialog (the native <dialog>: focus moves in, Escape closes).
export function Dialog({ title, onClose, children }) {
  const ref = useRef(null);
  useEffect(() => {
    const d = ref.current;
    if (d && !d.open) d.showModal();
    const close = (e) => {
      e.preventDefault();
      onClose();
    };
    d.addEventListener('cancel', close);
    return () => d.removeEventListener('cancel', close);
  }, []);
  return (
    <dialog ref={ref} aria-label={title}>
      <div class="dialog-head">
        <h2>{title}</h2>
        <button type="button" class="ghost" onClick={onClose} aria-label="Close">
          ×
        </button>
      </div>
      {children}
    </dialog>
  );
}

// A button that runs an async action, shows it is busy and reports an error through `onError`.
export function Action({ run, onError, children, kind = '', label, disabled }) {
  const [busy, setBusy] = useState(false);
  const click = async () => {
    setBusy(true);
    try {
      await run();
      onError && onError(null);
    } catch (e) {
      onError && onError(e);
    } finally {
      setBusy(false);
    }
  };
  return (
    <button type="button" class={kind} onClick={click} disabled={busy || disabled} aria-label={label}>
      {busy ? '…' : children}
    </button>
  );
}

export function Field({ label, children, hint }) {
  return (
    <label class="field">
      <span>{label}</span>
      {children}
      {hint && <small class="muted">{hint}</small>}
    </label>
  );
}

export function mb(n) {
  if (n === undefined || n === null) return '';
  if (n >= 1024) return `${(n / 1024).toFixed(n >= 10240 ? 0 : 1)} GiB`;
  return `${n} MiB`;
}

export function bytes(n) {
  if (!n && n !== 0) return '';
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < u.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(i ? 1 : 0)} ${u[i]}`;
}

export function when(ts) {
  if (!ts) return '';
  const d = new Date(ts);
  return Number.isNaN(d.getTime()) ? String(ts) : d.toLocaleString();
}

// "in 59 min", "3 h ago"
export function relative(ts) {
  if (!ts) return '';
  const s = Math.round((new Date(ts).getTime() - Date.now()) / 1000);
  const a = Math.abs(s);
  if (a < 5) return 'just now';
  const t = a < 90 ? `${a} s` : a < 5400 ? `${Math.round(a / 60)} min` : a < 172800 ? `${Math.round(a / 3600)} h` : `${Math.round(a / 86400)} d`;
  return s >= 0 ? `in ${t}` : `${t} ago`;
}
