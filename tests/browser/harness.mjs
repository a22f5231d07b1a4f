// The real Hangar for the browser test: an orchestrator and one host agent driving the fake
// Parallels (`hangar-fake-prlctl`, built by `cargo test --workspace` or `cargo build -p
// hangar-parallels`), each a `hangar serve` on 127.0.0.1 with its own data folder, as
// crates/hangar/tests/common does it. Every process started here is killed by `stopAll()`.
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';

export const ROOT_PASSWORD = 'Root-Passw0rd!-browser';
export const USER_PASSWORD = 'User-Passw0rd!-browser';
export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

/** The folder of the built binaries: HANGAR_BIN_DIR, or $CARGO_TARGET_DIR/debug, or target/debug. */
export function binDir() {
  if (process.env.HANGAR_BIN_DIR) return path.resolve(process.env.HANGAR_BIN_DIR);
  const target = process.env.CARGO_TARGET_DIR ? path.resolve(REPO, process.env.CARGO_TARGET_DIR) : path.join(REPO, 'target');
  return path.join(target, 'debug');
}

export function bin(name = 'hangar') {
  const p = path.join(binDir(), name);
  if (!fs.existsSync(p)) throw new Error(`${p} is missing: build it first (cargo build -p hangar -p hangar-parallels)`);
  return p;
}

const children = new Set();

/** Kill every process this harness started. */
export function stopAll() {
  for (const c of children) {
    if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  }
  children.clear();
}
process.on('exit', stopAll);

/** Start a child and resolve with the first stdout line `pattern` matches (deadline `ms`). */
export function startProcess(cmd, args, { env = {}, logPath, pattern, ms = 60000 }) {
  const log = fs.openSync(logPath, 'a');
  const child = spawn(cmd, args, { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', log] });
  children.add(child);
  const lines = readline.createInterface({ input: child.stdout });
  const seen = [];
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      reject(new Error(`${cmd} did not print ${pattern} within ${ms} ms; stdout: ${seen.join('\n')}\nlog: ${readLog(logPath)}`));
    }, ms);
    lines.on('line', (line) => {
      seen.push(line);
      const m = line.match(pattern);
      if (m) {
        clearTimeout(timer);
        resolve({ child, match: m, lines: seen });
      }
    });
    child.on('exit', (code, sig) => {
      clearTimeout(timer);
      reject(new Error(`${cmd} exited (${code ?? sig}) before it was ready; log: ${readLog(logPath)}`));
    });
  });
}

function readLog(p) {
  try {
    return fs.readFileSync(p, 'utf8').slice(-4000);
  } catch {
    return '';
  }
}

/** `hangar serve` on 127.0.0.1 with a data folder and `--set` settings; resolves {url, child, log}. */
export async function startServer(dir, settings = {}, env = {}, port = 0) {
  fs.mkdirSync(dir, { recursive: true });
  const args = ['serve', '--data-dir', dir, '--port', String(port), '--set', 'API_HOST=127.0.0.1'];
  for (const [k, v] of Object.entries(settings)) args.push('--set', `${k}=${v}`);
  const log = path.join(dir, 'server.log');
  const base = { ...process.env };
  delete base.HANGAR_CONFIG;
  const { child, match } = await startProcess(bin(), args, {
    env: { ...base, ROOT_PASSWORD, LOG_LEVEL: 'info', ...env },
    logPath: log,
    pattern: /^\s*listening on (\S+)/,
  });
  return { child, log, dir, url: match[1].replace('0.0.0.0', '127.0.0.1') };
}

/** A fake Parallels host's tools and state, with a golden bundle `images/golden.pvm`. */
export function fakeParallels(dir) {
  const tools = path.join(dir, 'tools');
  const state = path.join(dir, 'prl-state');
  const images = path.join(dir, 'images');
  for (const d of [tools, state, images]) fs.mkdirSync(d, { recursive: true });
  const fake = bin('hangar-fake-prlctl');
  fs.symlinkSync(fake, path.join(tools, 'prlctl'));
  fs.symlinkSync(fake, path.join(tools, 'prlsrvctl'));
  const prlctl = (...args) => {
    const r = spawnSync(path.join(tools, 'prlctl'), args, { env: { ...process.env, FAKE_PRL_STATE_DIR: state } });
    if (r.status !== 0) throw new Error(`prlctl ${args.join(' ')}: ${r.stderr}`);
  };
  prlctl('create', 'golden', '--distribution', 'ubuntu');
  prlctl('unregister', 'golden');
  fs.renameSync(path.join(state, 'Parallels/golden.pvm'), path.join(images, 'golden.pvm'));
  return { tools, state, images, prlctl };
}

/** A host agent (api, host, catalog) driving the fake. */
export function startAgent(dir, fake, extra = {}) {
  return startServer(
    path.join(dir, 'data'),
    {
      ENABLED_MODULES: 'api,host,catalog',
      HYPERVISOR: 'parallels',
      PRLCTL_PATH: path.join(fake.tools, 'prlctl'),
      HOST_IMAGES_FOLDER: fake.images,
      SYSTEM_RESERVED_CPU: '0',
      ...extra,
    },
    { FAKE_PRL_STATE_DIR: fake.state },
  );
}

/** Push the bundle at `bundle` to `server`'s catalog as `catalogId` 1.0.0 (amd64), with the CLI. */
export function pushBundle(server, token, dir, bundle, catalogId) {
  const provider = `provider=local-storage;catalog_path=${path.join(dir, 'store')}`;
  const args = ['--output', 'json', '--url', server.url, 'catalog', 'push', '--provider', provider,
    '--catalog-id', catalogId, '--version', '1.0.0', '--architecture', 'amd64', '--path', bundle];
  const env = { ...process.env, HANGAR_TOKEN: token, HANGAR_CONFIG_DIR: path.join(dir, 'cli'),
    XDG_CACHE_HOME: path.join(dir, 'cli-cache') };
  delete env.HANGAR_URL;
  delete env.HANGAR_API_KEY;
  const r = spawnSync(bin(), args, { env, encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`catalog push ${catalogId}: ${r.stderr}`);
}

/** A JSON call to the API; resolves {status, body, headers}. */
export async function call(server, method, apiPath, { token, body, headers = {} } = {}) {
  const h = { ...headers };
  if (token) h.authorization = `Bearer ${token}`;
  if (body !== undefined) h['content-type'] = 'application/json';
  const r = await fetch(`${server.url}/api/v1${apiPath}`, {
    method,
    headers: h,
    body: body === undefined ? undefined : JSON.stringify(body),
    redirect: 'manual',
  });
  const text = await r.text();
  let parsed = text;
  try {
    parsed = JSON.parse(text);
  } catch {
    /* not JSON */
  }
  return { status: r.status, body: parsed, headers: r.headers };
}

export async function login(server, username, password) {
  const r = await call(server, 'POST', '/auth/token', { body: { username, password } });
  if (r.status !== 200) throw new Error(`login as ${username}: ${r.status} ${JSON.stringify(r.body)}`);
  return r.body.token;
}

/** A TCP port free on 127.0.0.1 right now (for servers whose URL must be known before they start). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Wait until `f()` resolves truthy, polling every 100 ms, for at most `ms`. */
export async function waitFor(what, f, ms = 30000) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      last = await f();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what} (last: ${last})`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** An orchestrator with one fake-Parallels agent registered as `host-a`, the image `ubuntu-ci`
 * in both catalogs (the console lists the orchestrator's, the host pulls from its own). */
export async function fleet(dir, orchSettings = {}, orchPort = 0) {
  const fake = fakeParallels(path.join(dir, 'a'));
  const agent = await startAgent(path.join(dir, 'a'), fake);
  const orch = await startServer(path.join(dir, 'orch'), {
    ENABLED_MODULES: 'api,orchestrator,catalog',
    ORCHESTRATOR_CHECK_INTERVAL: '1s',
    ...orchSettings,
  }, {}, orchPort);
  const agentRoot = await login(agent, 'root', ROOT_PASSWORD);
  const root = await login(orch, 'root', ROOT_PASSWORD);
  const golden = path.join(fake.images, 'golden.pvm');
  pushBundle(agent, agentRoot, path.join(dir, 'a'), golden, 'ubuntu-ci');
  pushBundle(orch, root, path.join(dir, 'orch'), golden, 'ubuntu-ci');
  return { fake, agent, orch, root, agentRoot };
}

/** Register the agent on the orchestrator (as `name`); resolves the host id. */
export async function registerHost(orch, root, agent, name = 'host-a') {
  const r = await call(orch, 'POST', '/orchestrator/hosts', {
    token: root,
    body: { name, host: agent.url, tags: ['ci', 'fake'], authentication: { username: 'root', password: ROOT_PASSWORD } },
  });
  if (r.status !== 201) throw new Error(`register ${name}: ${r.status} ${JSON.stringify(r.body)}`);
  return r.body.id;
}
