import { useEffect, useState } from 'preact/hooks';
import { enc, get, patch } from '../api.js';
import { Action, Badge, ErrorBox, Table, bytes, relative, useData, useLive } from '../ui.jsx';

export function Catalog({ can }) {
  const list = useData(can('LIST_CATALOG_MANIFEST') ? '/catalog' : null);
  const [error, setError] = useState(null);
  const entries = [];
  for (const group of list.data || []) for (const es of Object.values(group)) entries.push(...es);
  const at = (m, op) => `/catalog/${enc(m.catalog_id)}/${enc(m.version)}/${enc(m.architecture)}/${op}`;
  const update = can('UPDATE_CATALOG_MANIFEST');
  const cols = [
    { key: 'catalog_id', label: 'Image', render: (m) => <strong>{m.catalog_id}</strong> },
    { key: 'version', label: 'Version' },
    { key: 'architecture', label: 'Architecture' },
    { key: 'size', label: 'Size', render: (m) => bytes(m.size) },
    { key: 'tags', label: 'Tags', render: (m) => (m.tags || []).map((t) => <Badge key={t}>{t}</Badge>) },
    {
      key: 'status',
      label: 'Status',
      render: (m) =>
        m.revoked ? (
          <Badge kind="bad">revoked</Badge>
        ) : m.tainted ? (
          <span>
            <Badge kind="bad">tainted</Badge> <small class="muted">{m.taint_reason || ''}</small>
          </span>
        ) : (
          <Badge kind="ok">available</Badge>
        ),
    },
    {
      key: 'access',
      label: 'Access rules',
      render: (m) =>
        (m.required_roles || []).length + (m.required_claims || []).length === 0 ? (
          <span class="muted">anyone who may pull</span>
        ) : (
          <span>
            {(m.required_roles || []).map((r) => <Badge key={r}>role {r}</Badge>)}
            {(m.required_claims || []).map((c) => <Badge key={c}>claim {c}</Badge>)}
          </span>
        ),
    },
  ];
  if (update || can.super) {
    cols.push({
      key: 'actions',
      label: 'Actions',
      render: (m) => (
        <div class="actions">
          {update && !m.revoked && !m.tainted && (
            <Action onError={setError} label={`Taint ${m.id}`} run={async () => (await patch(at(m, 'taint'), { reason: 'tainted from the console' }), list.reload())}>
              Taint
            </Action>
          )}
          {update && m.tainted && (
            <Action onError={setError} label={`Untaint ${m.id}`} run={async () => (await patch(at(m, 'untaint')), list.reload())}>
              Untaint
            </Action>
          )}
          {can.super && !m.revoked && (
            <Action kind="danger" onError={setError} label={`Revoke ${m.id}`} run={async () => (await patch(at(m, 'revoke')), list.reload())}>
              Revoke
            </Action>
          )}
        </div>
      ),
    });
  }
  return (
    <section aria-labelledby="cat-h">
      <div class="section-head">
        <h1 id="cat-h">Catalog</h1>
      </div>
      <ErrorBox error={error || list.error} />
      {can('LIST_CATALOG_MANIFEST') &&
        (list.loading ? <p>Loading…</p> : <Table label="Catalog images" cols={cols} rows={entries} empty="The catalog is empty." />)}
      {can('LIST_CACHE') && <Caches can={can} />}
    </section>
  );
}

// Each host's cache (the fleet's hosts through the orchestrator, or this host's own).
function Caches({ can }) {
  const fleet = can.module('orchestrator');
  const [caches, setCaches] = useState([]);
  const [error, setError] = useState(null);
  const load = async () => {
    try {
      if (fleet && can('LIST_ORCHESTRATOR_HOSTS')) {
        const hs = await get('/orchestrator/hosts');
        const out = await Promise.all(
          hs.map(async (h) => {
            try {
              return { host: h.name, list: await get(`/orchestrator/hosts/${enc(h.id)}/catalog/cache`) };
            } catch (e) {
              return { host: h.name, error: e };
            }
          }),
        );
        setCaches(out);
      } else if (can.module('host')) {
        setCaches([{ host: 'this host', list: await get('/catalog/cache') }]);
      }
      setError(null);
    } catch (e) {
      setError(e);
    }
  };
  useEffect(() => {
    load();
  }, []);
  useLive(['catalog_cache'], load);
  const cols = [
    { key: 'catalog_id', label: 'Image' },
    { key: 'version', label: 'Version' },
    { key: 'architecture', label: 'Architecture' },
    { key: 'size', label: 'Size', render: (c) => bytes(c.size) },
    { key: 'used', label: 'Used', render: (c) => `${c.used_count}×, last ${relative(c.last_used_at)}` },
  ];
  return (
    <section aria-labelledby="cache-h">
      <h2 id="cache-h">Host caches</h2>
      <ErrorBox error={error} />
      {caches.length === 0 && <p class="muted">No host cache to show.</p>}
      {caches.map((c) => (
        <div key={c.host} class="cache">
          <h3>
            {c.host} {c.list && <small class="muted">{bytes(c.list.total_size)}</small>}
          </h3>
          {c.error ? <ErrorBox error={c.error} /> : <Table label={`Cache of ${c.host}`} cols={cols} rows={c.list?.manifests} empty="Empty." />}
        </div>
      ))}
    </section>
  );
}
