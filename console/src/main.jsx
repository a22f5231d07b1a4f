import { render } from 'preact';
import { useEffect, useState } from 'preact/hooks';
import { ApiError, del, get, setCsrf, setUnauthorizedHandler } from './api.js';
import { Login } from './views/login.jsx';
import { Fleet } from './views/fleet.jsx';
import { Machines } from './views/machines.jsx';
import { Catalog } from './views/catalog.jsx';
import { People } from './views/people.jsx';
import { Keys } from './views/keys.jsx';
import { Audit } from './views/audit.jsx';
import { Proxy } from './views/proxy.jsx';
import './style.css';

const ROOT = '/console/';

// Who may do what: the caller's effective claims (GET /console/capabilities).
export function makeCan(caps) {
  const set = new Set(caps.claims || []);
  const can = (...claims) => caps.super_user || claims.some((c) => set.has(c));
  can.super = !!caps.super_user;
  can.module = (m) => (caps.modules || []).includes(m);
  return can;
}

const VIEWS = [
  { id: 'fleet', label: 'Fleet', show: (can) => can.module('orchestrator') && can('LIST_ORCHESTRATOR_HOSTS'), C: Fleet },
  { id: 'machines', label: 'Machines', show: (can) => can('LIST_VM'), C: Machines },
  { id: 'catalog', label: 'Catalog', show: (can) => can.module('catalog') && can('LIST_CATALOG_MANIFEST', 'LIST_CACHE'), C: Catalog },
  { id: 'people', label: 'Users & roles', show: (can) => can('LIST_USER', 'LIST_ROLE', 'LIST_CLAIM'), C: People },
  { id: 'keys', label: 'API keys', show: (can) => can('LIST_API_KEY', 'LIST_OWN_API_KEY'), C: Keys },
  { id: 'audit', label: 'Audit log', show: (can) => can.super, C: Audit },
  {
    id: 'proxy',
    label: 'Reverse proxy',
    show: (can) => (can.module('reverse_proxy') || can.module('orchestrator')) && can('LIST_REVERSE_PROXY_HOSTS'),
    C: Proxy,
  },
];

function currentView() {
  const rest = location.pathname.startsWith(ROOT) ? location.pathname.slice(ROOT.length) : '';
  return rest.split('/')[0] || '';
}

export function navigate(view) {
  history.pushState(null, '', `${ROOT}${view}`);
  dispatchEvent(new PopStateEvent('popstate'));
}

function App() {
  const [session, setSession] = useState(undefined); // undefined: loading, null: signed out
  const [caps, setCaps] = useState(null);
  const [view, setView] = useState(currentView());
  const [error, setError] = useState(null);

  const load = async () => {
    try {
      const s = await get('/auth/session');
      setCsrf(s.csrf_token);
      const c = await get('/console/capabilities');
      setCaps(c);
      setSession(s);
      setError(null);
    } catch (e) {
      setCsrf(null);
      setSession(null);
      if (!(e instanceof ApiError && e.status === 401)) setError(e);
    }
  };

  useEffect(() => {
    load();
    setUnauthorizedHandler(() => {
      setCsrf(null);
      setSession(null);
    });
    const pop = () => setView(currentView());
    addEventListener('popstate', pop);
    return () => removeEventListener('popstate', pop);
  }, []);

  if (session === undefined) return <p class="loading">Loading…</p>;
  if (session === null) return <Login onLogin={load} error={error} />;

  const can = makeCan(caps);
  const views = VIEWS.filter((v) => v.show(can));
  const active = views.find((v) => v.id === view) || views[0];
  const logout = async () => {
    try {
      await del('/auth/session');
    } finally {
      setCsrf(null);
      setSession(null);
      history.pushState(null, '', ROOT);
    }
  };
  const user = session.user || {};
  return (
    <div class="shell">
      <header class="top">
        <a class="brand" href={ROOT} onClick={(e) => (e.preventDefault(), navigate(''))}>
          Hangar
        </a>
        <div class="who" data-testid="who">
          <span class="user-name">{user.name || user.username}</span>
          <span class="muted user-roles">{(caps.roles || []).join(', ') || 'no role'}</span>
          {session.auth === 'oidc' && <span class="badge badge-neutral">SSO</span>}
          <button type="button" class="ghost" onClick={logout}>
            Sign out
          </button>
        </div>
      </header>
      <nav class="nav" aria-label="Console sections">
        <ul>
          {views.map((v) => (
            <li key={v.id}>
              <a
                href={`${ROOT}${v.id}`}
                aria-current={active && active.id === v.id ? 'page' : undefined}
                onClick={(e) => {
                  e.preventDefault();
                  navigate(v.id);
                }}
              >
                {v.label}
              </a>
            </li>
          ))}
        </ul>
      </nav>
      <main class="main" id="main">
        {active ? <active.C can={can} caps={caps} /> : <p>Your account may not see any part of this console.</p>}
      </main>
    </div>
  );
}

render(<App />, document.getElementById('app'));
