import { useEffect, useState } from 'preact/hooks';
import { enc, get, post, setCsrf } from '../api.js';
import { ErrorBox, Field } from '../ui.jsx';

export function Login({ onLogin, error: initial }) {
  const [username, setUsername] = useState('');
  const [password, setPassword] = useState('');
  const [error, setError] = useState(initial);
  const [busy, setBusy] = useState(false);
  const [providers, setProviders] = useState([]);

  useEffect(() => {
    get('/auth/providers')
      .then((p) => setProviders(Array.isArray(p) ? p : []))
      .catch(() => setProviders([]));
  }, []);

  const submit = async (e) => {
    e.preventDefault();
    setBusy(true);
    try {
      const s = await post('/auth/session', { username, password });
      setCsrf(s.csrf_token);
      setPassword('');
      await onLogin();
    } catch (err) {
      setError(err);
    } finally {
      setBusy(false);
    }
  };
  const back = location.pathname.startsWith('/console/') ? location.pathname : '/console/';
  return (
    <main class="login">
      <h1>Hangar</h1>
      <form onSubmit={submit} class="card" aria-label="Sign in">
        <h2>Sign in</h2>
        <ErrorBox error={error} />
        <Field label="Username or email">
          <input name="username" autocomplete="username" required value={username} onInput={(e) => setUsername(e.currentTarget.value)} />
        </Field>
        <Field label="Password">
          <input
            name="password"
            type="password"
            autocomplete="current-password"
            required
            value={password}
            onInput={(e) => setPassword(e.currentTarget.value)}
          />
        </Field>
        <button type="submit" class="primary" disabled={busy}>
          {busy ? 'Signing in…' : 'Sign in'}
        </button>
        {providers.length > 0 && (
          <div class="sso">
            <p class="muted">or</p>
            {providers.map((p) => (
              <a key={p.id} class="button" data-provider={p.id} href={`${p.login_url}?return_to=${enc(back)}`}>
                Sign in with {p.name}
              </a>
            ))}
          </div>
        )}
      </form>
    </main>
  );
}
