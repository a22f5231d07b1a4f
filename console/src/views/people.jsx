import { useState } from 'preact/hooks';
import { enc, post, put } from '../api.js';
import { Action, Badge, ErrorBox, Field, Table, useData, when } from '../ui.jsx';

export function People({ can }) {
  const tabs = [
    can('LIST_USER') && ['users', 'Users'],
    can('LIST_ROLE') && ['roles', 'Roles'],
    can('LIST_CLAIM') && ['claims', 'Claims'],
  ].filter(Boolean);
  const [tab, setTab] = useState(tabs[0][0]);
  return (
    <section aria-labelledby="people-h">
      <div class="section-head">
        <h1 id="people-h">Users &amp; roles</h1>
      </div>
      <div class="tabs" role="tablist">
        {tabs.map(([id, label]) => (
          <button key={id} type="button" role="tab" aria-selected={tab === id} onClick={() => setTab(id)}>
            {label}
          </button>
        ))}
      </div>
      {tab === 'users' && <Users can={can} />}
      {tab === 'roles' && <Roles />}
      {tab === 'claims' && <Claims />}
    </section>
  );
}

function Users({ can }) {
  const list = useData('/auth/users');
  const [error, setError] = useState(null);
  const [form, setForm] = useState({ username: '', email: '', password: '' });
  const create = async (e) => {
    e.preventDefault();
    try {
      await post('/auth/users', form);
      setForm({ username: '', email: '', password: '' });
      setError(null);
      list.reload();
    } catch (err) {
      setError(err);
    }
  };
  const cols = [
    { key: 'username', label: 'User', render: (u) => <strong>{u.username}</strong> },
    { key: 'email', label: 'Email' },
    { key: 'roles', label: 'Roles', render: (u) => (u.roles || []).map((r) => <Badge key={r}>{r}</Badge>) },
    { key: 'claims', label: 'Own claims', render: (u) => (u.claims || []).length || '' },
    {
      key: 'state',
      label: 'State',
      render: (u) => (
        <span>
          {u.disabled ? <Badge kind="bad">disabled</Badge> : <Badge kind="ok">active</Badge>}
          {u.blocked && <Badge kind="warn">locked</Badge>}
          {u.external_provider && <Badge>SSO</Badge>}
        </span>
      ),
    },
    { key: 'created_at', label: 'Created', render: (u) => when(u.created_at) },
  ];
  if (can('UPDATE_USER')) {
    cols.push({
      key: 'actions',
      label: 'Actions',
      render: (u) => (
        <Action onError={setError} label={`${u.disabled ? 'Enable' : 'Disable'} ${u.username}`} run={async () => (await put(`/auth/users/${enc(u.id)}`, { disabled: !u.disabled }), list.reload())}>
          {u.disabled ? 'Enable' : 'Disable'}
        </Action>
      ),
    });
  }
  const set = (k) => (e) => setForm({ ...form, [k]: e.currentTarget.value });
  return (
    <div>
      <ErrorBox error={error || list.error} />
      <Table label="Users" cols={cols} rows={list.data} />
      {can('CREATE_USER') && (
        <form onSubmit={create} class="form inline card" aria-label="New user">
          <Field label="Username">
            <input name="new-username" required value={form.username} onInput={set('username')} />
          </Field>
          <Field label="Email">
            <input name="new-email" type="email" required value={form.email} onInput={set('email')} />
          </Field>
          <Field label="Password">
            <input name="new-password" type="password" autocomplete="new-password" required value={form.password} onInput={set('password')} />
          </Field>
          <button type="submit">Add user</button>
        </form>
      )}
    </div>
  );
}

function Roles() {
  const list = useData('/auth/roles');
  const cols = [
    { key: 'name', label: 'Role', render: (r) => <strong>{r.name}</strong> },
    { key: 'description', label: 'Description' },
    { key: 'claims', label: 'Claims', render: (r) => <span class="claims">{(r.claims || []).join(', ')}</span> },
    { key: 'internal', label: '', render: (r) => (r.internal ? <Badge>built in</Badge> : '') },
  ];
  return (
    <div>
      <ErrorBox error={list.error} />
      <Table label="Roles" cols={cols} rows={list.data} />
    </div>
  );
}

function Claims() {
  const list = useData('/auth/claims');
  const cols = [
    { key: 'name', label: 'Claim', render: (c) => <code>{c.name}</code> },
    { key: 'group', label: 'Group' },
    { key: 'resource', label: 'Resource' },
    { key: 'action', label: 'Action' },
  ];
  return (
    <div>
      <ErrorBox error={list.error} />
      <Table label="Claims" cols={cols} rows={list.data} />
    </div>
  );
}
