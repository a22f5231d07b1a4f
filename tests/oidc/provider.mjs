// A real OpenID provider for Hangar's tests (oidc-provider from npm), never for production.
//
//   node tests/oidc/provider.mjs --port P --issuer http://127.0.0.1:P --config <file.json>
//
// prints one line `READY <issuer>` once it listens. The config file:
//   {
//     "clients": [ oidc-provider client metadata, e.g.
//       {"client_id": "hangar", "client_secret": "...", "redirect_uris": ["http://127.0.0.1:8080/api/v1/auth/oidc/sso/callback"],
//        "grant_types": ["authorization_code"], "response_types": ["code"]},
//       {"client_id": "hangar-cli", "token_endpoint_auth_method": "none", "redirect_uris": [],
//        "response_types": [], "grant_types": ["urn:ietf:params:oauth:grant-type:device_code"]},
//       {"client_id": "ci-bot", "client_secret": "...", "redirect_uris": [], "response_types": [],
//        "grant_types": ["client_credentials"]} ],
//     "users": [ {"id": "alice", "username": "alice", "password": "...", "email": "alice@example.com",
//                 "name": "Alice", "groups": ["hangar-admins"]} ],
//     "resource": "urn:hangar"   (the audience of client-credentials JWT access tokens),
//     "id_token_ttl": 600, "access_token_ttl": 600   (seconds, optional)
//   }
// POST /test/users/<id>/groups with a JSON list replaces a user's groups (a test changes
// the mapping's input between two logins). POST /test/mint with a JSON claims object answers
// a JWT signed with this provider's key (tests craft expired or foreign-audience tokens).
// Both exist only in this test provider.
//
// Selectors for browser tests (plain HTML, no scripts, no external assets):
//   login page   (/interaction/<uid>):  form#login, input[name=login], input[name=password],
//                                       button[type=submit]#login-submit
//   consent page (/interaction/<uid>):  form#consent, button[type=submit]#consent-submit
//   device code input (/device):        form#op.deviceInputForm, input[name=user_code], button#device-submit
//   device confirm:                     form#op.deviceConfirmForm, button#device-confirm
//   device done:                        h1#device-done

import { createServer } from 'node:http';
import { generateKeyPairSync, randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import Provider from 'oidc-provider';

function arg(name) {
  const i = process.argv.indexOf(`--${name}`);
  if (i < 0 || i + 1 >= process.argv.length) {
    console.error(`usage: node provider.mjs --port P --issuer URL --config FILE (missing --${name})`);
    process.exit(2);
  }
  return process.argv[i + 1];
}

const port = Number(arg('port'));
const issuer = arg('issuer');
const config = JSON.parse(readFileSync(arg('config'), 'utf8'));
const users = new Map((config.users || []).map((u) => [u.id, { ...u }]));
const resource = config.resource || 'urn:hangar';

// A key of this process only: two providers never share one.
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const jwk = { ...privateKey.export({ format: 'jwk' }), kid: randomUUID(), use: 'sig', alg: 'RS256' };

const esc = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const page = (title, body) => `<!DOCTYPE html><html><head><meta charset="utf-8"><title>${esc(title)}</title></head><body>${body}</body></html>`;

const provider = new Provider(issuer, {
  clients: config.clients || [],
  jwks: { keys: [jwk] },
  cookies: { keys: [randomUUID()] },
  findAccount: async (ctx, id) => {
    const u = users.get(id);
    if (!u) return undefined;
    return {
      accountId: id,
      claims: async () => ({
        sub: id,
        email: u.email,
        email_verified: true,
        name: u.name || u.username,
        preferred_username: u.username,
        groups: u.groups || [],
      }),
    };
  },
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username', 'groups'],
    groups: ['groups'],
  },
  scopes: ['openid', 'profile', 'email', 'groups', 'offline_access'],
  // The ID token carries the scopes' claims (groups among them), as most providers can.
  conformIdTokenClaims: false,
  pkce: { required: () => true },
  ttl: {
    IdToken: config.id_token_ttl || 600,
    AccessToken: config.access_token_ttl || 600,
    ClientCredentials: config.access_token_ttl || 600,
    DeviceCode: 600,
    Interaction: 600,
    Session: 3600,
    Grant: 3600,
  },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    deviceFlow: {
      enabled: true,
      userCodeInputSource: async (ctx, form, out, err) => {
        ctx.body = page('Device login', `<h1>Enter the code</h1>${err ? `<p id="error">${esc(err.message || err)}</p>` : ''}${form}<button id="device-submit" type="submit" form="op.deviceInputForm">Continue</button>`);
      },
      userCodeConfirmSource: async (ctx, form, client, deviceInfo, userCode) => {
        ctx.body = page('Confirm device', `<h1>Sign in ${esc(client.clientId)}?</h1><p>Code <code id="user-code">${esc(userCode)}</code></p>${form}<button id="device-confirm" type="submit" form="op.deviceConfirmForm">Continue</button>`);
      },
      successSource: async (ctx) => {
        ctx.body = page('Done', '<h1 id="device-done">Signed in; return to your terminal.</h1>');
      },
    },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => resource,
      useGrantedResource: () => true,
      getResourceServerInfo: () => ({
        scope: 'hangar',
        audience: resource,
        accessTokenTTL: config.access_token_ttl || 600,
        accessTokenFormat: 'jwt',
        jwt: { sign: { alg: 'RS256' } },
      }),
    },
    rpInitiatedLogout: { enabled: false },
  },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  renderError: async (ctx, out) => {
    ctx.type = 'html';
    ctx.body = page('Error', `<h1 id="error">${esc(out.error)}</h1><p>${esc(out.error_description || '')}</p>`);
  },
});

async function body(req) {
  const chunks = [];
  for await (const c of req) chunks.push(c);
  return Buffer.concat(chunks).toString('utf8');
}

function loginPage(uid, error) {
  return page('Sign in', `<h1>Sign in to the test provider</h1>${error ? `<p id="error">${esc(error)}</p>` : ''}
<form id="login" method="post" action="/interaction/${esc(uid)}/login">
<label>User <input name="login" autocomplete="username"></label>
<label>Password <input name="password" type="password" autocomplete="current-password"></label>
<button id="login-submit" type="submit">Sign in</button></form>`);
}

function consentPage(uid, client) {
  return page('Consent', `<h1>Allow ${esc(client)}?</h1>
<form id="consent" method="post" action="/interaction/${esc(uid)}/confirm">
<button id="consent-submit" type="submit">Allow</button></form>`);
}

function send(res, status, html, type = 'text/html; charset=utf-8') {
  res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store' });
  res.end(html);
}

async function interaction(req, res, parts) {
  const details = await provider.interactionDetails(req, res);
  const uid = details.uid;
  if (req.method === 'GET') {
    if (details.prompt.name === 'login') return send(res, 200, loginPage(uid));
    return send(res, 200, consentPage(uid, details.params.client_id));
  }
  if (parts[1] === 'login') {
    const form = new URLSearchParams(await body(req));
    const u = [...users.values()].find((x) => x.username === form.get('login'));
    if (!u || u.password !== form.get('password')) return send(res, 200, loginPage(uid, 'Wrong user or password'));
    return provider.interactionFinished(req, res, { login: { accountId: u.id } }, { mergeWithLastSubmission: false });
  }
  if (parts[1] === 'confirm') {
    await body(req);
    const { prompt: { details: d }, params, session } = details;
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    if (d.missingOIDCScope) grant.addOIDCScope(d.missingOIDCScope.join(' '));
    if (d.missingOIDCClaims) grant.addOIDCClaims(d.missingOIDCClaims);
    if (d.missingResourceScopes) {
      for (const [indicator, scopes] of Object.entries(d.missingResourceScopes)) {
        grant.addResourceScope(indicator, scopes.join(' '));
      }
    }
    const grantId = await grant.save();
    const consent = details.grantId ? {} : { grantId };
    return provider.interactionFinished(req, res, { consent }, { mergeWithLastSubmission: true });
  }
  return send(res, 404, page('Not found', '<h1>Not found</h1>'));
}

async function mint(req, res) {
  const claims = JSON.parse(await body(req));
  const { SignJWT, importJWK } = await import('jose');
  const key = await importJWK(jwk, 'RS256');
  const token = await new SignJWT(claims).setProtectedHeader({ alg: 'RS256', kid: jwk.kid, typ: 'JWT' }).sign(key);
  send(res, 200, JSON.stringify({ token }), 'application/json');
}

const callback = provider.callback();
const server = createServer(async (req, res) => {
  try {
    const url = new URL(req.url, issuer);
    const parts = url.pathname.split('/').filter(Boolean);
    if (parts[0] === 'interaction' && parts.length >= 2) return await interaction(req, res, parts.slice(1));
    if (req.method === 'POST' && parts[0] === 'test' && parts[1] === 'mint') return await mint(req, res);
    if (req.method === 'POST' && parts[0] === 'test' && parts[1] === 'users' && parts[3] === 'groups') {
      const u = users.get(decodeURIComponent(parts[2]));
      if (!u) return send(res, 404, '{}', 'application/json');
      u.groups = JSON.parse(await body(req));
      return send(res, 200, JSON.stringify(u.groups), 'application/json');
    }
    return callback(req, res);
  } catch (e) {
    console.error('provider error:', e);
    if (!res.headersSent) send(res, 500, page('Error', `<h1 id="error">${esc(e.message)}</h1>`));
  }
});

server.listen(port, '127.0.0.1', () => {
  console.log(`READY ${issuer}`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
