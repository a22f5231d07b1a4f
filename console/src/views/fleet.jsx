import { useState } from 'preact/hooks';
import { enc, put } from '../api.js';
import { Action, Badge, ErrorBox, StateBadge, Table, mb, relative, useData, useLive } from '../ui.jsx';

// total / system reserved / in use, for one resource of a host.
function Capacity({ r, k, fmt = (v) => v }) {
  if (!r || !r.total) return <span class="muted">unknown</span>;
  const total = r.total[k] ?? 0;
  const reserved = r.system_reserved?.[k] ?? 0;
  const used = r.in_use?.[k] ?? 0;
  return (
    <span class="capacity" title={`total ${fmt(total)}, reserved ${fmt(reserved)}, used ${fmt(used)}`}>
      <meter min={0} max={Math.max(total, 1)} value={used + reserved} aria-label={`${k} used and reserved`} />
      <span>
        {fmt(used)} used · {fmt(reserved)} reserved · {fmt(total)} total
      </span>
    </span>
  );
}

export function Fleet({ can }) {
  const hosts = useData('/orchestrator/hosts');
  const live = useLive(['orchestrator'], hosts.reload);
  const [error, setError] = useState(null);
  const manage = can('MANAGE_ORCHESTRATOR_HOSTS');
  const cols = [
    { key: 'name', label: 'Host', render: (h) => <strong class="host-name">{h.name}</strong> },
    { key: 'state', label: 'State', render: (h) => (
      <span>
        <StateBadge state={h.state} /> {h.enabled ? '' : <Badge kind="warn">disabled</Badge>}
        {h.last_error && <small class="muted block">{h.last_error}</small>}
      </span>
    ) },
    { key: 'tags', label: 'Tags', render: (h) => (h.tags || []).map((t) => <Badge key={t}>{t}</Badge>) },
    { key: 'cpu', label: 'CPU', render: (h) => <Capacity r={h.resources} k="cpu" /> },
    { key: 'mem', label: 'Memory', render: (h) => <Capacity r={h.resources} k="memory_mb" fmt={mb} /> },
    { key: 'vms', label: 'VMs', render: (h) => (h.vms || []).length },
    { key: 'version', label: 'Agent', render: (h) => (
      <span>
        {h.devops_version || <span class="muted">unknown</span>}
        {h.version_differs && <Badge kind="warn">differs</Badge>}
      </span>
    ) },
    { key: 'seen', label: 'Last seen', render: (h) => relative(h.last_seen) },
  ];
  if (manage) {
    cols.push({
      key: 'actions',
      label: 'Actions',
      render: (h) =>
        h.enabled ? (
          <Action onError={setError} label={`Disable ${h.name}`} run={async () => (await put(`/orchestrator/hosts/${enc(h.id)}/disable`), hosts.reload())}>
            Disable (drain)
          </Action>
        ) : (
          <Action onError={setError} label={`Enable ${h.name}`} run={async () => (await put(`/orchestrator/hosts/${enc(h.id)}/enable`), hosts.reload())}>
            Enable
          </Action>
        ),
    });
  }
  return (
    <section aria-labelledby="fleet-h">
      <div class="section-head">
        <h1 id="fleet-h">Fleet</h1>
        <LiveBadge live={live} />
      </div>
      <ErrorBox error={error || hosts.error} />
      {hosts.loading ? <p>Loading…</p> : <Table label="Hosts" cols={cols} rows={hosts.data} empty="No host is registered yet." />}
    </section>
  );
}

export function LiveBadge({ live }) {
  return (
    <span class={`live ${live ? 'on' : 'off'}`} data-testid="live" role="status">
      {live ? 'live' : 'connecting…'}
    </span>
  );
}
