// The OpenID provider of the browser test: tests/oidc/provider.mjs (oidc-provider from npm,
// installed here with `npm ci` when its node_modules are missing), with one confidential
// client for this Hangar and one user in the group that OIDC_ROLE_MAP maps to SUPER_USER.
// `start()` answers null when that script is not in the tree (the test then signs in with a
// local password and says so).
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { REPO, freePort, startProcess } from './harness.mjs';

export const PROVIDER_ID = 'sso';

export async function start(dir) {
  const oidcDir = path.join(REPO, 'tests/oidc');
  const script = path.join(oidcDir, 'provider.mjs');
  if (!fs.existsSync(script)) return null;
  if (!fs.existsSync(path.join(oidcDir, 'node_modules/oidc-provider'))) {
    const r = spawnSync('npm', ['ci', '--no-audit', '--no-fund', '--loglevel=error'], { cwd: oidcDir, encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`npm ci in tests/oidc: ${r.stderr}`);
  }
  const idpPort = await freePort();
  const orchPort = await freePort();
  const issuer = `http://127.0.0.1:${idpPort}`;
  const secret = 'browser-test-client-secret';
  const admin = { id: 'olivia', username: 'olivia', password: 'Olivia-Passw0rd!-idp', email: 'olivia@example.test', name: 'Olivia Ops', groups: ['hangar-admins'], role: 'SUPER_USER' };
  const config = {
    clients: [
      {
        client_id: 'hangar',
        client_secret: secret,
        redirect_uris: [`http://127.0.0.1:${orchPort}/api/v1/auth/oidc/${PROVIDER_ID}/callback`],
        grant_types: ['authorization_code'],
        response_types: ['code'],
      },
    ],
    users: [admin],
  };
  const file = path.join(dir, 'idp.json');
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(file, JSON.stringify(config));
  const { child } = await startProcess('node', [script, '--port', String(idpPort), '--issuer', issuer, '--config', file], {
    logPath: path.join(dir, 'idp.log'),
    pattern: /^READY /,
  });
  return {
    provider: PROVIDER_ID,
    admin,
    orchPort,
    settings: {
      OIDC_ISSUER_URL: issuer,
      OIDC_CLIENT_ID: 'hangar',
      OIDC_CLIENT_SECRET: secret,
      OIDC_ROLE_MAP: 'hangar-admins=SUPER_USER',
      OIDC_PROVIDER_ID: PROVIDER_ID,
      OIDC_PROVIDER_NAME: 'Test IdP',
    },
    // The provider's own pages: its login form, then its consent form (selectors documented
    // at the top of tests/oidc/provider.mjs).
    async fillLogin(page, user) {
      await page.locator('form#login').waitFor({ timeout: 30000 });
      await page.locator('input[name=login]').fill(user.username);
      await page.locator('input[name=password]').fill(user.password);
      await page.locator('#login-submit').click();
      const consent = page.locator('#consent-submit');
      const nav = page.getByRole('navigation', { name: 'Console sections' });
      await Promise.race([consent.waitFor({ timeout: 30000 }), nav.waitFor({ timeout: 30000 })]);
      if (await consent.isVisible()) await consent.click();
    },
    stop() {
      if (child.exitCode === null) child.kill('SIGKILL');
    },
  };
}
