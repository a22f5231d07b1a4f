import { useEffect, useRef, useState } from 'preact/hooks';
import { del, enc, get, post, put, subscribe } from '../api.js';
import { Action, Badge, Dialog, ErrorBox, Field, StateBadge, Table, mb, relative, useData, useLive } from '../ui.jsx';
import { LiveBadge } from './fleet.jsx';

// One shape for a VM, whether the orchestrator (fleet) or a host answered it.
function norm(m) {
  return {
    id: m.id || m.ID,
    name: m.name || m.Name,
    state: m.state || m.State,
    host: m.host || m.host_name || '',
    owner: m.owner || m.user || '',
    ip: m.internal_ip_address || (m.ip_addresses || [])[0] || '',
    expires_at: m.expires_at || null,
    os: m.os || m.OS || '',
    cpu: m.cpu ?? m.Hardware?.cpu?.cpus,
    memory_mb: m.memory_mb,
  };
}

function catalogEntries(list) {
  const out = [];
  for (const group of list || []) {
    for (const entries of Object.values(group)) for (const e of entries) out.push(e);
  }
  return out.filter((e) => !e.revoked);
}

export function Machines({ can, caps }) {
  const fleet = can.module('orchestrator');
  const base = fleet ? '/orchestrator/machines' : '/machines';
  const vms = useData(base);
  const live = useLive(['pdfm', 'orchestrator'], vms.reload);
  const [error, setError] = useState(null);
  const [dialog, setDialog] = useState(null);
  const [jobs, setJobs] = useState([]);
  // The API lists a user's own VMs only unless it holds LIST_ALL_VMS or MANAGE_ALL_VMS;
  // the console applies the same rule to what it shows.
  const mineOnly = !can('MANAGE_ALL_VMS') && !can('LIST_ALL_VMS');
  const rows = (vms.data || []).map(norm).filter((v) => !mineOnly || v.owner === caps.username);
  const at = (vm, op = '') => `${base}/${enc(vm.id)}${op}`;
  const reload = () => vms.reload();
  const running = (vm) => String(vm.state).toLowerCase() === 'running';

  const cols = [
    { key: 'name', label: 'Name', render: (v) => <strong class="vm-name">{v.name}</strong> },
    { key: 'state', label: 'State', render: (v) => <StateBadge state={v.state} /> },
  ];
  if (fleet) cols.push({ key: 'host', label: 'Host' });
  cols.push(
    { key: 'owner', label: 'Owner' },
    { key: 'ip', label: 'IP', render: (v) => v.ip || <span class="muted">none</span> },
    { key: 'size', label: 'Size', render: (v) => [v.cpu ? `${v.cpu} CPU` : '', v.memory_mb ? mb(v.memory_mb) : ''].filter(Boolean).join(' · ') },
  );
  if (fleet) cols.push({ key: 'ttl', label: 'TTL', render: (v) => (v.expires_at ? <span title={v.expires_at}>{relative(v.expires_at)}</span> : <span class="muted">none</span>) });
  cols.push({
    key: 'actions',
    label: 'Actions',
    render: (v) => (
      <div class="actions">
        {can('UPDATE_VM_STATES') &&
          (running(v) ? (
            <Action onError={setError} label={`Stop ${v.name}`} run={async () => (await put(at(v, '/stop')), reload())}>
              Stop
            </Action>
          ) : (
            <Action onError={setError} label={`Start ${v.name}`} run={async () => (await put(at(v, '/start')), reload())}>
              Start
            </Action>
          ))}
        {fleet && can('UPDATE_VM') && v.expires_at && (
          <Action onError={setError} label={`Extend the TTL of ${v.name} by one hour`} run={async () => (await put(at(v, '/extend'), { ttl_seconds: 3600 }), reload())}>
            +1 h
          </Action>
        )}
        {can('LIST_SNAPSHOT_VM', 'LIST_OWN_VM_SNAPSHOT') && (
          <button type="button" onClick={() => setDialog({ kind: 'snapshots', vm: v })} aria-label={`Snapshots of ${v.name}`}>
            Snapshots
          </button>
        )}
        {can('EXECUTE_COMMAND_VM') && (
          <button type="button" onClick={() => setDialog({ kind: 'exec', vm: v })} aria-label={`Run a command in ${v.name}`}>
            Exec
          </button>
        )}
        {can('DELETE_VM') && (
          <button type="button" class="danger" onClick={() => setDialog({ kind: 'delete', vm: v })} aria-label={`Delete ${v.name}`}>
            Delete
          </button>
        )}
      </div>
    ),
  });

  const started = (job) => setJobs((js) => [job, ...js]);
  return (
    <section aria-labelledby="vms-h">
      <div class="section-head">
        <h1 id="vms-h">Machines</h1>
        <LiveBadge live={live} />
        {can('CREATE_VM') && (
          <button type="button" class="primary" onClick={() => setDialog({ kind: 'create' })}>
            New machine
          </button>
        )}
      </div>
      {mineOnly && <p class="muted">Your machines.</p>}
      <ErrorBox error={error || vms.error} />
      {jobs.map((j) => (
        <JobProgress key={j.id} job={j} fleet={fleet} onDone={reload} onDismiss={() => setJobs((js) => js.filter((x) => x.id !== j.id))} />
      ))}
      {vms.loading ? <p>Loading…</p> : <Table label="Machines" cols={cols} rows={rows} empty="No machine yet." />}
      {dialog?.kind === 'create' && <CreateDialog can={can} fleet={fleet} onClose={() => setDialog(null)} onStarted={started} />}
      {dialog?.kind === 'exec' && <ExecDialog vm={dialog.vm} at={at} onClose={() => setDialog(null)} />}
      {dialog?.kind === 'snapshots' && <SnapshotsDialog vm={dialog.vm} at={at} can={can} onClose={() => setDialog(null)} />}
      {dialog?.kind === 'delete' && (
        <Dialog title={`Delete ${dialog.vm.name}?`} onClose={() => setDialog(null)}>
          <p>The machine and its disks are deleted on {dialog.vm.host || 'its host'}. This cannot be undone.</p>
          <div class="buttons">
            <Action
              kind="danger"
              onError={setError}
              run={async () => {
                await del(at(dialog.vm));
                setDialog(null);
                reload();
              }}
            >
              Delete {dialog.vm.name}
            </Action>
            <button type="button" onClick={() => setDialog(null)}>
              Cancel
            </button>
          </div>
        </Dialog>
      )}
    </section>
  );
}

function CreateDialog({ can, fleet, onClose, onStarted }) {
  const catalog = useData(can('LIST_CATALOG_MANIFEST') && can.module('catalog') ? '/catalog' : null);
  const entries = catalogEntries(catalog.data);
  const [name, setName] = useState('');
  const [entry, setEntry] = useState('');
  const [ttl, setTtl] = useState('4');
  const [start, setStart] = useState(false);
  const [connection, setConnection] = useState('');
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  useEffect(() => {
    if (!entry && entries.length) setEntry(entries[0].id);
  }, [entries.length]);
  const submit = async (e) => {
    e.preventDefault();
    const m = entries.find((x) => x.id === entry);
    if (!m) return setError(new Error('Choose a catalog image'));
    setBusy(true);
    const body = {
      name,
      architecture: m.architecture,
      start_on_create: start,
      catalog_manifest: { catalog_id: m.catalog_id, version: m.version, architecture: m.architecture },
    };
    if (connection.trim()) body.catalog_manifest.connection = connection.trim();
    if (fleet && Number(ttl) > 0) body.ttl_seconds = Math.round(Number(ttl) * 3600);
    try {
      const job = await post(fleet ? '/orchestrator/machines/async' : '/machines/async', body);
      onStarted(job);
      onClose();
    } catch (err) {
      setError(err);
    } finally {
      setBusy(false);
    }
  };
  return (
    <Dialog title="New machine from a catalog image" onClose={onClose}>
      <form onSubmit={submit} class="form">
        <ErrorBox error={error || catalog.error} />
        <Field label="Name">
          <input name="name" required pattern="[A-Za-z0-9][A-Za-z0-9._\-]*" value={name} onInput={(e) => setName(e.currentTarget.value)} />
        </Field>
        <Field label="Catalog image">
          <select name="image" required value={entry} onChange={(e) => setEntry(e.currentTarget.value)}>
            {entries.map((m) => (
              <option key={m.id} value={m.id} disabled={m.tainted}>
                {m.catalog_id} {m.version} ({m.architecture}){m.tainted ? ' — tainted' : ''}
              </option>
            ))}
          </select>
        </Field>
        {fleet && (
          <Field label="Time to live (hours)" hint="0: keep until deleted">
            <input name="ttl" type="number" min="0" step="0.5" value={ttl} onInput={(e) => setTtl(e.currentTarget.value)} />
          </Field>
        )}
        <label class="check">
          <input type="checkbox" checked={start} onChange={(e) => setStart(e.currentTarget.checked)} /> Start it once created
        </label>
        <Field label="Pull from (optional)" hint="Empty: the host's own catalog. Or host=https://user:password@catalog-server">
          <input name="connection" type="password" autocomplete="off" value={connection} onInput={(e) => setConnection(e.currentTarget.value)} />
        </Field>
        <div class="buttons">
          <button type="submit" class="primary" disabled={busy}>
            {busy ? 'Creating…' : 'Create'}
          </button>
          <button type="button" onClick={onClose}>
            Cancel
          </button>
        </div>
      </form>
    </Dialog>
  );
}

// A create job's progress: job_manager events and the job's own route until it finishes.
function JobProgress({ job: first, fleet, onDone, onDismiss }) {
  const [job, setJob] = useState(first);
  const done = useRef(false);
  const path = `${fleet ? '/orchestrator/jobs' : '/jobs'}/${enc(first.id)}`;
  useEffect(() => {
    let stop = false;
    const refresh = async () => {
      try {
        const j = await get(path);
        setJob(j);
        if (['completed', 'failed', 'cancelled'].includes(j.state) && !done.current) {
          done.current = true;
          onDone();
        }
      } catch {
        /* the next tick tries again */
      }
    };
    const unsub = subscribe(['job_manager'], (ev) => {
      const body = ev.body || {};
      if (!ev.body || body.id === first.id || body.job_id === first.id) refresh();
    });
    const tick = async () => {
      while (!stop && !done.current) {
        await refresh();
        await new Promise((r) => setTimeout(r, 1000));
      }
    };
    tick();
    return () => {
      stop = true;
      unsub();
    };
  }, [path]);
  const finished = ['completed', 'failed', 'cancelled'].includes(job.state);
  const result = job.result || {};
  const step = (job.steps || []).find((s) => s.state === 'running') || {};
  return (
    <div class={`job card job-${job.state}`} data-job={job.id} role="status" aria-live="polite">
      <div class="job-line">
        <strong>
          {job.job_operation} {result.name || ''}
        </strong>
        <StateBadge state={job.state} />
        <span class="muted">{Math.round(job.progress || 0)}%</span>
        {finished && (
          <button type="button" class="ghost" onClick={onDismiss} aria-label="Dismiss">
            ×
          </button>
        )}
      </div>
      <progress max="100" value={job.progress || 0} aria-label="Progress" />
      <small class="muted">
        {job.error || (finished && result.host ? `on ${result.host}` : step.message || job.message || step.name || '')}
      </small>
    </div>
  );
}

function ExecDialog({ vm, at, onClose }) {
  const [command, setCommand] = useState('');
  const [out, setOut] = useState(null);
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const run = async (e) => {
    e.preventDefault();
    setBusy(true);
    setError(null);
    try {
      setOut(await put(at(vm, '/execute'), { command }));
    } catch (err) {
      setError(err);
    } finally {
      setBusy(false);
    }
  };
  return (
    <Dialog title={`Run a command in ${vm.name}`} onClose={onClose}>
      <form onSubmit={run} class="form">
        <Field label="Command">
          <input name="command" required value={command} onInput={(e) => setCommand(e.currentTarget.value)} autocomplete="off" />
        </Field>
        <div class="buttons">
          <button type="submit" class="primary" disabled={busy}>
            {busy ? 'Running…' : 'Run'}
          </button>
        </div>
      </form>
      <ErrorBox error={error} />
      {out && (
        <div class="exec-out">
          <p>
            Exit code <Badge kind={out.exit_code === 0 ? 'ok' : 'bad'}>{out.exit_code}</Badge>
            {out.error ? ` ${out.error}` : ''}
          </p>
          <pre aria-label="Standard output">{out.stdout || ''}</pre>
          {out.stderr && <pre class="stderr" aria-label="Standard error">{out.stderr}</pre>}
        </div>
      )}
    </Dialog>
  );
}

function SnapshotsDialog({ vm, at, can, onClose }) {
  const list = useData(at(vm, '/snapshots'));
  const [name, setName] = useState('');
  const [error, setError] = useState(null);
  const create = async (e) => {
    e.preventDefault();
    try {
      await post(at(vm, '/snapshots'), { snapshot_name: name, snapshot_description: '' });
      setName('');
      list.reload();
    } catch (err) {
      setError(err);
    }
  };
  const cols = [
    { key: 'name', label: 'Name' },
    { key: 'date', label: 'Taken' },
    { key: 'current', label: '', render: (s) => (s.current ? <Badge kind="ok">current</Badge> : '') },
    {
      key: 'actions',
      label: 'Actions',
      render: (s) => (
        <div class="actions">
          {can('REVERT_SNAPSHOT_VM', 'REVERT_OWN_VM_SNAPSHOT') && (
            <Action onError={setError} run={async () => (await post(at(vm, `/snapshots/${enc(s.id)}/revert`)), list.reload())}>
              Revert
            </Action>
          )}
          {can('DELETE_SNAPSHOT_VM', 'DELETE_OWN_VM_SNAPSHOT') && (
            <Action kind="danger" onError={setError} run={async () => (await del(at(vm, `/snapshots/${enc(s.id)}`)), list.reload())}>
              Delete
            </Action>
          )}
        </div>
      ),
    },
  ];
  return (
    <Dialog title={`Snapshots of ${vm.name}`} onClose={onClose}>
      <ErrorBox error={error || list.error} />
      <Table label="Snapshots" cols={cols} rows={list.data} empty="No snapshot." />
      {can('CREATE_SNAPSHOT_VM', 'CREATE_OWN_VM_SNAPSHOT') && (
        <form onSubmit={create} class="form inline">
          <Field label="New snapshot">
            <input name="snapshot" required value={name} onInput={(e) => setName(e.currentTarget.value)} />
          </Field>
          <button type="submit">Take snapshot</button>
        </form>
      )}
    </Dialog>
  );
}
