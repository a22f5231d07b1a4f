import { useEffect, useState } from 'preact/hooks';
import { enc, get } from '../api.js';
import { Badge, ErrorBox, Table, useData } from '../ui.jsx';

// Reverse-proxy hosts and their routes: each fleet host's, or this server's own.
export function Proxy({ can }) {
  const fleet = can.module('orchestrator');
  const hosts = useData(fleet ? '/orchestrator/hosts' : null);
  const [groups, setGroups] = useState([]);
  const [error, setError] = useState(null);
  useEffect(() => {
    (async () => {
      try {
        if (fleet) {
          const hs = hosts.data || [];
          setGroups(
            await Promise.all(
              hs.map(async (h) => {
                try {
                  return { name: h.name, list: await get(`/orchestrator/hosts/${enc(h.id)}/reverse-proxy/hosts`) };
                } catch (e) {
                  return { name: h.name, error: e };
                }
              }),
            ),
          );
        } else {
          setGroups([{ name: 'this server', list: await get('/reverse-proxy/hosts') }]);
        }
      } catch (e) {
        setError(e);
      }
    })();
  }, [hosts.data]);
  const routes = (p) => [
    ...(p.http_routes || []).map((r) => `${r.path || '/'} → ${r.target_host || r.target_vm_id || ''}${r.target_port ? `:${r.target_port}` : ''}`),
    ...(p.tcp_route ? [`tcp → ${p.tcp_route.target_host || p.tcp_route.target_vm_id || ''}:${p.tcp_route.target_port || ''}`] : []),
  ];
  const cols = [
    { key: 'name', label: 'Proxy host', render: (p) => <strong>{p.name || p.id}</strong> },
    { key: 'bind', label: 'Listens on', render: (p) => `${p.host || '*'}:${p.port || 80}` },
    { key: 'routes', label: 'Routes', render: (p) => <ul class="plain">{routes(p).map((r) => <li key={r}>{r}</li>)}</ul> },
    { key: 'auth', label: 'Access', render: (p) => (p.require_auth ? <Badge>auth required</Badge> : <Badge kind="warn">open</Badge>) },
  ];
  return (
    <section aria-labelledby="proxy-h">
      <div class="section-head">
        <h1 id="proxy-h">Reverse proxy</h1>
      </div>
      <ErrorBox error={error || hosts.error} />
      {groups.length === 0 && <p class="muted">No proxy host.</p>}
      {groups.map((g) => (
        <div key={g.name}>
          <h2>{g.name}</h2>
          {g.error && g.error.status === 503 ? (
            <p class="muted">The reverse proxy does not run on this host.</p>
          ) : g.error ? (
            <ErrorBox error={g.error} />
          ) : <Table label={`Proxy hosts of ${g.name}`} cols={cols} rows={g.list} empty="No proxy host." />}
        </div>
      ))}
    </section>
  );
}
