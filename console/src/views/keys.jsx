import { useState } from 'preact/hooks';
import { del, enc, post, put } from '../api.js';
import { Action, Badge, ErrorBox, Field, Table, useData, when } from '../ui.jsx';

export function Keys({ can }) {
  const list = useData('/auth/api_keys');
  const [error, setError] = useState(null);
  const [name, setName] = useState('');
  const [created, setCreated] = useState(null);
  const create = async (e) => {
    e.preventDefault();
    try {
      const k = await post('/auth/api_keys', { name });
      setCreated(k);
      setName('');
      setError(null);
      list.reload();
    } catch (err) {
      setError(err);
    }
  };
  const cols = [
    { key: 'name', label: 'Name', render: (k) => <strong>{k.name}</strong> },
    { key: 'key', label: 'Key id', render: (k) => <code>{k.key}</code> },
    { key: 'state', label: 'State', render: (k) => (k.revoked ? <Badge kind="bad">revoked</Badge> : k.expired ? <Badge kind="warn">expired</Badge> : <Badge kind="ok">active</Badge>) },
    { key: 'expires_at', label: 'Expires', render: (k) => when(k.expires_at) || 'never' },
    { key: 'created_at', label: 'Created', render: (k) => when(k.created_at) },
    {
      key: 'actions',
      label: 'Actions',
      render: (k) => (
        <div class="actions">
          {!k.revoked && can('UPDATE_API_KEY', 'UPDATE_OWN_API_KEY') && (
            <Action onError={setError} label={`Revoke ${k.name}`} run={async () => (await put(`/auth/api_keys/${enc(k.id)}/revoke`), list.reload())}>
              Revoke
            </Action>
          )}
          {can('DELETE_API_KEY', 'DELETE_OWN_API_KEY') && (
            <Action kind="danger" onError={setError} label={`Delete ${k.name}`} run={async () => (await del(`/auth/api_keys/${enc(k.id)}`), list.reload())}>
              Delete
            </Action>
          )}
        </div>
      ),
    },
  ];
  return (
    <section aria-labelledby="keys-h">
      <div class="section-head">
        <h1 id="keys-h">API keys</h1>
      </div>
      <ErrorBox error={error || list.error} />
      {created && (
        <div class="card secret" role="alert">
          <p>
            <strong>Copy the new key now: its secret is not shown again.</strong> Send it as <code>X-Api-Key</code>.
          </p>
          <pre data-testid="new-key">{created.encoded}</pre>
          <button type="button" onClick={() => setCreated(null)}>
            I have copied it
          </button>
        </div>
      )}
      <Table label="API keys" cols={cols} rows={list.data} empty="No API key." />
      {can('CREATE_API_KEY', 'CREATE_OWN_API_KEY') && (
        <form onSubmit={create} class="form inline card" aria-label="New API key">
          <Field label="New key's name">
            <input name="key-name" required value={name} onInput={(e) => setName(e.currentTarget.value)} />
          </Field>
          <button type="submit">Create key</button>
        </form>
      )}
    </section>
  );
}
