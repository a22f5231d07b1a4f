// The web console in a real browser: Debian's /usr/bin/chromium driven by playwright-core,
// against a real Hangar (an orchestrator and a fake-Parallels host agent, tests/browser/harness.mjs)
// and, when H16a's tests/oidc/provider.mjs is there, a real OpenID provider (oidc-provider).
//
// Screenshots of every view, at 1280x800 and at phone width, go to
// $HANGAR_ARTIFACTS_DIR/console (default target/artifacts/console); the folder is printed.
// Run: scripts/test.sh (after cargo test), or by hand after `cargo build -p hangar -p
// hangar-parallels` and scripts/build-console.sh: `cd tests/browser && npm ci && npm test`.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';
import * as h from './harness.mjs';
import * as sso from './sso.mjs';

const CHROMIUM = process.env.HANGAR_CHROMIUM || '/usr/bin/chromium';
const ARTIFACTS = path.resolve(h.REPO, process.env.HANGAR_ARTIFACTS_DIR || 'target/artifacts', 'console');
const DESKTOP = { width: 1280, height: 800 };
const PHONE = { width: 390, height: 844 };
const WAIT = 30000;

let dir;
let f; // the fleet
let browser;
let idp = null; // the OpenID provider, when available

before(async () => {
  if (!fs.existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} is missing: apt-get install chromium (scripts/test.sh does)`);
  }
  dir = fs.mkdtempSync(path.join(process.env.HANGAR_TEST_TMP || os.tmpdir(), 'hangar-browser-'));
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  idp = await sso.start(dir); // null when tests/oidc/provider.mjs is not there yet
  f = await h.fleet(dir, idp ? idp.settings : {}, idp ? idp.orchPort : 0);
  console.log(idp ? 'single sign-on: through tests/oidc/provider.mjs' : 'single sign-on: tests/oidc/provider.mjs missing, local password only');
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox', '--disable-dev-shm-usage'] });
  console.log(`screenshots: ${ARTIFACTS}`);
});

after(async () => {
  if (browser) await browser.close();
  h.stopAll();
  if (idp) idp.stop();
  if (dir && !process.env.HANGAR_KEEP_TEST_DIR) fs.rmSync(dir, { recursive: true, force: true });
});

async function shot(page, name) {
  await page.setViewportSize(DESKTOP);
  await page.screenshot({ path: path.join(ARTIFACTS, `${name}-desktop.png`), fullPage: true });
  await page.setViewportSize(PHONE);
  await page.screenshot({ path: path.join(ARTIFACTS, `${name}-phone.png`), fullPage: true });
  await page.setViewportSize(DESKTOP);
}

async function newPage() {
  const context = await browser.newContext({ viewport: DESKTOP, baseURL: f.orch.url });
  const page = await context.newPage();
  const problems = [];
  // Script errors fail the test; refused API calls are only reported (the API decides, and
  // some are expected: a host without the reverse proxy answers 503).
  page.on('console', (m) => m.type() === 'error' && !m.text().startsWith('Failed to load resource') && problems.push(m.text()));
  page.on('pageerror', (e) => problems.push(String(e)));
  page.on('response', (r) => r.status() >= 400 && console.log(`  (${r.status()} ${r.request().method()} ${new URL(r.url()).pathname})`));
  return { context, page, problems };
}

async function localLogin(page, username, password) {
  await page.goto('/');
  await page.getByLabel('Username or email').fill(username);
  await page.getByLabel('Password').fill(password);
  await page.getByRole('button', { name: 'Sign in', exact: true }).click();
  await page.getByRole('navigation', { name: 'Console sections' }).waitFor({ timeout: WAIT });
}

const row = (page, text) => page.locator('tbody tr', { hasText: text });

test('the console is served with its security headers and / redirects to it', async () => {
  const r = await fetch(`${f.orch.url}/`, { redirect: 'manual' });
  assert.equal(r.status, 302);
  assert.equal(r.headers.get('location'), '/console/');
  const index = await fetch(`${f.orch.url}/console/`);
  assert.equal(index.status, 200);
  assert.match(index.headers.get('content-type'), /^text\/html/);
  assert.equal(index.headers.get('cache-control'), 'no-cache');
  assert.match(index.headers.get('content-security-policy'), /default-src 'self'/);
  assert.equal(index.headers.get('x-frame-options'), 'DENY');
  const html = await index.text();
  assert.ok(!html.includes('not built'), 'this binary was built without console/dist: run scripts/build-console.sh first');
  const asset = html.match(/\/console\/assets\/[^"]+\.js/);
  assert.ok(asset, html);
  const js = await fetch(`${f.orch.url}${asset[0]}`);
  assert.equal(js.status, 200);
  assert.match(js.headers.get('content-type'), /^text\/javascript/);
  assert.match(js.headers.get('cache-control'), /immutable/);
  assert.equal((await fetch(`${f.orch.url}/console/assets/nope.js`)).status, 404);
  // Deny by default still holds next to the public console.
  assert.equal((await fetch(`${f.orch.url}/api/v1/orchestrator/hosts`)).status, 401);
  assert.equal((await fetch(`${f.orch.url}/api/v1/console/capabilities`)).status, 401);
});

test('an operator signs in, sees a host and a VM appear live, creates, stops and deletes a VM, signs out', async () => {
  const { context, page, problems } = await newPage();
  await page.goto('/');
  await page.getByRole('heading', { name: 'Sign in' }).waitFor();
  await shot(page, '01-login');
  let expectRole = 'SUPER_USER';
  if (idp) {
    // Through the OpenID provider's own login page; the mapped role shows in the header.
    await page.locator(`a[data-provider="${idp.provider}"]`).click();
    await idp.fillLogin(page, idp.admin);
    expectRole = idp.admin.role;
    await page.getByRole('navigation', { name: 'Console sections' }).waitFor({ timeout: WAIT });
    assert.match(await page.getByTestId('who').innerText(), /SSO/);
  } else {
    await localLogin(page, 'root', h.ROOT_PASSWORD);
  }
  assert.match(await page.getByTestId('who').innerText(), new RegExp(expectRole));

  // Fleet: empty, then the host registered through the API appears without a reload.
  await page.getByRole('link', { name: 'Fleet' }).click();
  await page.getByText('live', { exact: true }).waitFor({ timeout: WAIT });
  await page.getByText('No host is registered yet.').waitFor();
  const hostId = await h.registerHost(f.orch, f.root, f.agent);
  await row(page, 'host-a').getByText('healthy').waitFor({ timeout: WAIT });
  assert.match(await row(page, 'host-a').innerText(), /0\.1\.0/); // the agent's version
  await shot(page, '02-fleet');

  // Machines: a VM made through the API appears live.
  await page.getByRole('link', { name: 'Machines' }).click();
  await page.getByText('live', { exact: true }).waitFor({ timeout: WAIT });
  const made = await h.call(f.orch, 'POST', '/orchestrator/machines', {
    token: f.root,
    body: { name: 'api-vm', architecture: 'x86_64', ttl_seconds: 3600, catalog_manifest: { catalog_id: 'ubuntu-ci', version: '1.0.0' } },
  });
  assert.ok(made.status >= 200 && made.status < 300, JSON.stringify(made.body));
  await row(page, 'api-vm').waitFor({ timeout: WAIT });
  assert.match(await row(page, 'api-vm').innerText(), /host-a/);

  // Create from the catalog in the console, and watch the job's progress.
  await page.getByRole('button', { name: 'New machine' }).click();
  const dialog = page.getByRole('dialog');
  await dialog.getByLabel('Name').fill('console-vm');
  await dialog.getByLabel('Catalog image').selectOption({ label: 'ubuntu-ci 1.0.0 (x86_64)' });
  await dialog.getByRole('button', { name: 'Create' }).click();
  const job = page.locator('[data-job]');
  await job.waitFor({ timeout: WAIT });
  await job.locator('progress').waitFor();
  await page.locator('[data-job].job-completed').waitFor({ timeout: WAIT });
  assert.equal(await job.locator('progress').getAttribute('value'), '100');
  await row(page, 'console-vm').waitFor({ timeout: WAIT });
  await shot(page, '03-machines');

  // Start, stop (the state follows live), then delete.
  const vm = row(page, 'console-vm');
  await vm.getByRole('button', { name: 'Start console-vm' }).click();
  await vm.getByText('running').waitFor({ timeout: WAIT });
  await vm.getByRole('button', { name: 'Run a command in console-vm' }).click();
  await page.getByRole('dialog').getByLabel('Command').fill('uname -a');
  await page.getByRole('dialog').getByRole('button', { name: 'Run' }).click();
  await page.getByRole('dialog').locator('.exec-out').waitFor({ timeout: WAIT });
  await shot(page, '04-exec');
  await page.keyboard.press('Escape');
  await vm.getByRole('button', { name: 'Stop console-vm' }).click();
  await vm.getByText('stopped').waitFor({ timeout: WAIT });
  await vm.getByRole('button', { name: 'Snapshots of console-vm' }).click();
  await page.getByRole('dialog').getByLabel('New snapshot').fill('before-tests');
  await page.getByRole('dialog').getByRole('button', { name: 'Take snapshot' }).click();
  await page.getByRole('dialog').locator('tbody tr', { hasText: 'before-tests' }).waitFor({ timeout: WAIT });
  await shot(page, '05-snapshots');
  await page.keyboard.press('Escape');
  await vm.getByRole('button', { name: 'Delete console-vm' }).click();
  await page.getByRole('dialog').getByRole('button', { name: 'Delete console-vm' }).click();
  await row(page, 'console-vm').waitFor({ state: 'detached', timeout: WAIT });
  const left = await h.call(f.orch, 'GET', '/orchestrator/machines', { token: f.root });
  assert.ok(!left.body.some((m) => m.name === 'console-vm'), 'console-vm is gone from the API too');

  // Every other view, desktop and phone.
  for (const [link, name, heading] of [
    ['Catalog', '06-catalog', 'Catalog'],
    ['Users & roles', '07-users', 'Users & roles'],
    ['API keys', '08-api-keys', 'API keys'],
    ['Audit log', '09-audit', 'Audit log'],
    ['Reverse proxy', '10-reverse-proxy', 'Reverse proxy'],
  ]) {
    await page.getByRole('link', { name: link }).click();
    await page.getByRole('heading', { name: heading, level: 1 }).waitFor();
    if (link === 'Catalog') await row(page, 'ubuntu-ci').first().waitFor();
    if (link === 'API keys') {
      await page.getByLabel("New key's name").fill('ci-key');
      await page.getByRole('button', { name: 'Create key' }).click();
      await page.getByTestId('new-key').waitFor();
    }
    if (link === 'Audit log') await page.locator('tbody tr').first().waitFor();
    await shot(page, name);
  }
  void hostId;

  // Keyboard: a section is a real link, reached by focus and followed with Enter.
  await page.getByRole('link', { name: 'Machines' }).focus();
  await page.keyboard.press('Enter');
  await page.getByRole('heading', { name: 'Machines', level: 1 }).waitFor();
  await page.keyboard.press('Tab');
  assert.equal(await page.evaluate(() => document.activeElement.tagName), 'A');

  // Sign out: the session is gone on the server too.
  await page.getByRole('button', { name: 'Sign out' }).click();
  await page.getByRole('heading', { name: 'Sign in' }).waitFor();
  assert.equal((await context.request.get('/api/v1/auth/session')).status(), 401);
  assert.deepEqual(problems, [], 'script errors in the page');
  await context.close();
});

test("a plain user's session shows only its own VMs and cannot reach another user's", async () => {
  const made = await h.call(f.orch, 'POST', '/auth/users', {
    token: f.root,
    // The USER role plus the claims to act on VMs (its own only: no MANAGE_ALL_VMS).
    body: { username: 'alice', email: 'alice@example.test', password: h.USER_PASSWORD, claims: ['UPDATE_VM_STATES', 'DELETE_VM'] },
  });
  assert.equal(made.status, 201, JSON.stringify(made.body));
  const hosts = await h.call(f.orch, 'GET', '/orchestrator/hosts', { token: f.root });
  if (hosts.body.length === 0) await h.registerHost(f.orch, f.root, f.agent);
  const mk = async (name, owner) => {
    const r = await h.call(f.orch, 'POST', '/orchestrator/machines', {
      token: f.root,
      body: { name, owner, architecture: 'x86_64', catalog_manifest: { catalog_id: 'ubuntu-ci', version: '1.0.0' } },
    });
    assert.ok(r.status >= 200 && r.status < 300, JSON.stringify(r.body));
    return r.body.id;
  };
  await mk('alice-vm', 'alice');
  const rootVm = await mk('root-only-vm', 'root');

  const { context, page } = await newPage();
  await localLogin(page, 'alice', h.USER_PASSWORD);
  const nav = await page.getByRole('navigation', { name: 'Console sections' }).innerText();
  assert.ok(!/Fleet|Audit|Users/.test(nav), `a plain user sees only what it may: ${nav}`);
  await page.getByRole('link', { name: 'Machines' }).click();
  await row(page, 'alice-vm').waitFor({ timeout: WAIT });
  assert.equal(await row(page, 'root-only-vm').count(), 0);
  await row(page, 'alice-vm').getByRole('button', { name: 'Start alice-vm' }).click();
  await row(page, 'alice-vm').getByText('running').waitFor({ timeout: WAIT });
  await shot(page, '11-plain-user-machines');

  // With its cookie, straight at the API: reading or acting on another user's VM is
  // refused, also with the right CSRF token (reads are owner-scoped in the API:
  // hangar_core::vm), its VM list holds its own VMs only, and a state change without the
  // CSRF header is refused before anything happens.
  const csrf = (await (await context.request.get('/api/v1/auth/session')).json()).csrf_token;
  assert.ok(csrf, 'the session answers a CSRF token');
  const listed = await (await context.request.get('/api/v1/orchestrator/machines')).json();
  assert.ok(Array.isArray(listed) && listed.every((m) => m.id !== rootVm), 'the API lists alice no VM of root');
  for (const [method, url] of [
    ['get', `/api/v1/orchestrator/machines/${rootVm}`],
    ['get', `/api/v1/orchestrator/machines/${rootVm}/status`],
    ['delete', `/api/v1/orchestrator/machines/${rootVm}`],
    ['put', `/api/v1/orchestrator/machines/${rootVm}/start`],
  ]) {
    const r = await context.request[method](url, { headers: { 'x-csrf-token': csrf } });
    assert.ok([403, 404].includes(r.status()), `${method} another user's VM: ${r.status()}`);
  }
  const noCsrf = await context.request.put(`/api/v1/auth/me/password`, { data: { password: 'x' } });
  assert.equal(noCsrf.status(), 403);
  assert.match(JSON.stringify(await noCsrf.json()), /csrf/i);
  const still = await h.call(f.orch, 'GET', `/orchestrator/machines/${rootVm}`, { token: f.root });
  assert.equal(still.status, 200, 'root-only-vm is still there');
  await context.close();
});
