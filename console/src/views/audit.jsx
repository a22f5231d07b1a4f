import { ErrorBox, Table, useData, when } from '../ui.jsx';

export function Audit() {
  const list = useData('/audit?limit=200');
  const rows = [...(list.data || [])].reverse();
  const cols = [
    { key: 'at', label: 'When', render: (a) => when(a.at) },
    { key: 'username', label: 'Who', render: (a) => `${a.username} (${a.via})` },
    { key: 'action', label: 'Action', render: (a) => <code>{a.action}</code> },
    { key: 'target', label: 'Target', render: (a) => `${a.target_type} ${a.target_id}` },
    { key: 'source_ip', label: 'From', render: (a) => a.source_ip || '' },
  ];
  return (
    <section aria-labelledby="audit-h">
      <div class="section-head">
        <h1 id="audit-h">Audit log</h1>
        <button type="button" onClick={list.reload}>
          Refresh
        </button>
      </div>
      <ErrorBox error={list.error} />
      {list.loading ? <p>Loading…</p> : <Table label="Audit entries" cols={cols} rows={rows} empty="No entry." />}
    </section>
  );
}
