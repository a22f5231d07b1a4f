"""Render deploy/helm/hangar with Helm's own Go SDK and validate what it renders.

Run through scripts/check-helm.sh, which installs the two PyPI packages this needs:
helm-python-sdk (libhelm_c: a C ABI over Helm v4's official Go SDK, so rendering is Helm's
own, `lookup` answering empty as in `helm template`) and kubernetes-validate (the Kubernetes
OpenAPI schemas as JSON schemas, offline).

For every value set in deploy/helm/hangar/ci/ it:
  - lints the chart (helm lint --strict: warnings fail too),
  - renders it and parses every manifest,
  - validates every object against the Kubernetes schemas of the oldest version the chart
    supports (kubeVersion) and the newest the package ships, strictly (unknown fields fail),
    and the ServiceMonitor against the part of the Prometheus Operator's schema it uses,
  - checks what the chart promises: replicas and strategy per engine, probes, security
    context, the Secret's keys, DATABASE_URL, that every configuration key given to the
    container is one the binary reads (KEYS in crates/hangar/src/config.rs).
It also checks that values which would make a broken release fail to render (the templates'
checks and values.schema.json). With a built `hangar` binary (--binary) it then
runs the Deployment's container as the pod would, for the value sets on the JSON engine: the
container's args and environment (Secret references resolved from the rendered Secret, the
key files written read-only into <data>/secrets/ where the pod mounts them), on loopback, and
checks that the liveness and readiness paths answer 200 and root logs in with the password
the Secret holds.
Exit status 1 on any problem, with every problem listed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "hangar"
CONFIG_RS = ROOT / "crates" / "hangar" / "src" / "config.rs"
KEY_FILES = ["catalog-providers.key", "orchestrator-hosts.key", "api-key-pepper.key"]
K8S_VERSIONS = ["1.25.0", kubernetes_validate.latest_version()]

# What each value set must give (the value sets themselves are in ci/).
EXPECT = {
    "default-values.yaml": dict(replicas=1, strategy="Recreate", pvc=True, sql=False, ingress=False, monitor=None),
    "sql-ha-values.yaml": dict(replicas=3, strategy="RollingUpdate", pvc=False, sql=True, ingress=True, monitor="http"),
    "existing-secrets-values.yaml": dict(
        replicas=2, strategy="RollingUpdate", pvc=False, sql=True, ingress=False, monitor="metrics", own_secret=False
    ),
    "json-many-values.yaml": dict(replicas=1, strategy="Recreate", pvc=False, sql=False, ingress=False, monitor=None),
    "eddsa-sql-values.yaml": dict(replicas=2, strategy="RollingUpdate", pvc=False, sql=True, ingress=False, monitor=None),
}

# Values that must not render, and a word the error must contain.
MUST_FAIL = [
    ({"store": {"engine": "sql"}}, "databaseUrl"),
    ({"serviceMonitor": {"enabled": True}}, "serviceMonitor"),
    # values.schema.json
    ({"store": {"engine": "mongo"}}, "store/engine"),
    ({"modules": "api,hots"}, "modules"),
    ({"auth": {"jwtSecret": "short"}}, "jwtSecret"),
    ({"config": {"log_level": "debug"}}, "log_level"),
    ({"ingress": {"enabled": True, "hosts": [{"host": "h"}]}}, "paths"),
]

# The part of the Prometheus Operator's ServiceMonitor (monitoring.coreos.com/v1) the chart
# writes; unknown fields fail, as kubernetes-validate's strict mode does for built-in kinds.
SECRET_KEY_SELECTOR = {
    "type": "object",
    "required": ["name", "key"],
    "properties": {"name": {"type": "string", "minLength": 1}, "key": {"type": "string", "minLength": 1}},
    "additionalProperties": False,
}
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "additionalProperties": False,
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                    "additionalProperties": False,
                },
                "namespaceSelector": {
                    "type": "object",
                    "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}},
                    "additionalProperties": False,
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "authorization": {
                                "type": "object",
                                "properties": {"type": {"type": "string"}, "credentials": SECRET_KEY_SELECTOR},
                                "additionalProperties": False,
                            },
                        },
                    },
                },
            },
        },
    },
}


def config_keys() -> set[str]:
    """The keys the binary reads: every k("NAME", ...) and s("NAME", ...) of KEYS."""
    text = CONFIG_RS.read_text()
    start = text.index("pub const KEYS")
    end = text.index("];", start)
    return set(re.findall(r'\b[ks]\(\s*"([A-Z0-9_]+)"', text[start:end]))


def render(values: dict) -> list[dict]:
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values, name="hangar", namespace="ci", is_install=True)
    objs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt") or not text.strip():
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("__path", path)
                objs.append(doc)
    return objs


def validate(obj: dict, problems: list[str], where: str) -> None:
    body = {k: v for k, v in obj.items() if k != "__path"}
    what = f"{where}: {body.get('kind')}/{body.get('metadata', {}).get('name')}"
    if body.get("apiVersion", "").startswith("monitoring.coreos.com/"):
        for e in jsonschema.Draft7Validator(SERVICE_MONITOR_SCHEMA).iter_errors(body):
            problems.append(f"{what}: {e.message} at {'/'.join(map(str, e.path))}")
        return
    for v in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(body, v, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{what} (Kubernetes {v}): {e.message} at {'/'.join(map(str, e.path))}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(f"{what} (Kubernetes {v}): no schema: {e}")


def check_promises(name: str, values: dict, objs: list[dict], keys: set[str], problems: list[str]) -> None:
    exp = EXPECT[name]
    by_kind: dict[str, list[dict]] = {}
    for o in objs:
        by_kind.setdefault(o["kind"], []).append(o)

    def fail(msg: str) -> None:
        problems.append(f"{name}: {msg}")

    deps = by_kind.get("Deployment", [])
    if len(deps) != 1:
        fail(f"{len(deps)} Deployments, want 1")
        return
    d = deps[0]["spec"]
    if d["replicas"] != exp["replicas"]:
        fail(f"replicas {d['replicas']}, want {exp['replicas']}")
    if d["strategy"]["type"] != exp["strategy"]:
        fail(f"strategy {d['strategy']['type']}, want {exp['strategy']}")
    pod = d["template"]["spec"]
    c = pod["containers"][0]
    if c["livenessProbe"]["httpGet"]["path"] != "/api/v1/health/probe":
        fail(f"liveness probe path {c['livenessProbe']['httpGet']['path']}")
    if c["readinessProbe"]["httpGet"]["path"] != "/api/v1/health/ready":
        fail(f"readiness probe path {c['readinessProbe']['httpGet']['path']}")
    sc = c["securityContext"]
    if not (
        sc.get("readOnlyRootFilesystem") is True
        and sc.get("allowPrivilegeEscalation") is False
        and sc.get("capabilities", {}).get("drop") == ["ALL"]
        and pod["securityContext"].get("runAsNonRoot") is True
    ):
        fail(f"security context is not non-root, read-only, no capabilities: {sc} {pod['securityContext']}")
    if not c.get("resources", {}).get("requests") or not c.get("resources", {}).get("limits"):
        fail("no resource requests and limits")
    env = {e["name"]: e for e in c["env"]}
    unknown = sorted(set(env) - keys)
    if unknown:
        fail(f"environment names the binary does not read (not in KEYS of config.rs): {unknown}")
    hmac = values.get("auth", {}).get("jwtAlgorithm", "HS256").startswith("HS")
    jwt_key = "JWT_HMACS_SECRET" if hmac else "JWT_PRIVATE_KEY"
    if jwt_key not in env:
        fail(f"no {jwt_key} for {values.get('auth', {}).get('jwtAlgorithm', 'HS256')}")
    for secret_key in ["ROOT_PASSWORD", "JWT_HMACS_SECRET", "JWT_PRIVATE_KEY", "DATABASE_URL"]:
        if secret_key in env and "valueFrom" not in env[secret_key]:
            fail(f"{secret_key} is given in clear in the pod, not from a Secret")
    if "ROOT_PASSWORD" not in env:
        fail("no ROOT_PASSWORD")
    if exp["sql"] != ("DATABASE_URL" in env):
        fail(f"DATABASE_URL in the pod: {'DATABASE_URL' in env}, want {exp['sql']}")
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for f in KEY_FILES:
        if f"/data/secrets/{f}" not in mounts:
            fail(f"the key file {f} is not mounted into /data/secrets")
    vols = {v["name"]: v for v in pod["volumes"]}
    data_is_pvc = "persistentVolumeClaim" in vols["data"]
    if data_is_pvc == exp["sql"]:
        fail(f"the data folder is {'a PVC' if data_is_pvc else 'not a PVC'} with sql={exp['sql']}")
    if exp["pvc"] != bool(by_kind.get("PersistentVolumeClaim")):
        fail(f"PersistentVolumeClaim rendered: {bool(by_kind.get('PersistentVolumeClaim'))}, want {exp['pvc']}")
    if (exp["replicas"] > 1) != bool(by_kind.get("PodDisruptionBudget")):
        fail(f"PodDisruptionBudget rendered: {bool(by_kind.get('PodDisruptionBudget'))} with {exp['replicas']} pods")
    if exp["ingress"] != bool(by_kind.get("Ingress")):
        fail(f"Ingress rendered: {bool(by_kind.get('Ingress'))}, want {exp['ingress']}")
    sms = by_kind.get("ServiceMonitor", [])
    if exp["monitor"] is None and sms:
        fail("a ServiceMonitor was rendered though it is off by default")
    if exp["monitor"] is not None:
        if len(sms) != 1:
            fail("no ServiceMonitor")
        else:
            ep = sms[0]["spec"]["endpoints"][0]
            if ep["port"] != exp["monitor"]:
                fail(f"ServiceMonitor scrapes port {ep['port']}, want {exp['monitor']}")
            if ep["port"] == "http" and "authorization" not in ep:
                fail("the ServiceMonitor scrapes the API port without a bearer token")
            svc_ports = {p["name"] for s in by_kind.get("Service", []) for p in s["spec"]["ports"]}
            if ep["port"] not in svc_ports:
                fail(f"the ServiceMonitor's port {ep['port']} is not a Service port ({svc_ports})")
    secrets = by_kind.get("Secret", [])
    if exp.get("own_secret", True):
        if len(secrets) != 1:
            fail(f"{len(secrets)} Secrets, want 1")
        else:
            data = secrets[0]["data"]
            want = {"ROOT_PASSWORD", jwt_key, *KEY_FILES} | ({"DATABASE_URL"} if exp["sql"] else set())
            if set(data) != want:
                fail(f"Secret keys {sorted(data)}, want {sorted(want)}")
            for f in KEY_FILES:
                if len(base64.b64decode(data[f])) != 32:
                    fail(f"{f} is not 32 bytes")
            pw = base64.b64decode(data["ROOT_PASSWORD"]).decode()
            if not (
                len(pw) >= 12
                and re.search("[A-Z]", pw)
                and re.search("[a-z]", pw)
                and re.search("[0-9]", pw)
                and re.search("[^A-Za-z0-9]", pw)
            ):
                fail("the generated root password does not meet the default password policy")
            if hmac and len(base64.b64decode(data.get("JWT_HMACS_SECRET", ""))) < 32:
                fail("JWT_HMACS_SECRET is shorter than 32 bytes")
            if not hmac and b"PRIVATE KEY-----" not in base64.b64decode(data.get("JWT_PRIVATE_KEY", "")):
                fail("JWT_PRIVATE_KEY is not a PEM private key")
            if secrets[0]["metadata"].get("annotations", {}).get("helm.sh/resource-policy") != "keep":
                fail("the Secret is not kept on uninstall")
    elif secrets:
        fail("the chart made a Secret though auth.existingSecret was given")


def served(path: str) -> bool:
    """Whether GET `path` (/api/v1/...) is a route of the committed OpenAPI document."""
    doc = json.loads((ROOT / "docs" / "openapi.json").read_text())
    rel = path.removeprefix("/api/v1")
    return "get" in doc.get("paths", {}).get(rel, {})


class Pod:
    """The Deployment's container run with the real binary on loopback, as the kubelet would
    start it: its args and environment (Secret references resolved from the rendered Secret),
    the key files written read-only where the pod mounts them, paths under a temporary root."""

    def __init__(self, objs: list[dict], binary: str, database_url: str | None = None) -> None:
        dep = next(o for o in objs if o["kind"] == "Deployment")
        secret = next(o for o in objs if o["kind"] == "Secret")
        data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
        c = dep["spec"]["template"]["spec"]["containers"][0]
        self.container = c
        self.dir = tempfile.TemporaryDirectory(prefix="hangar-pod-")
        root = Path(self.dir.name)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(root)}
        for e in c["env"]:
            if "value" in e:
                env[e["name"]] = e["value"]
            else:
                ref = e["valueFrom"]["secretKeyRef"]
                env[e["name"]] = data[ref["key"]].decode()
        env["DATABASE_FOLDER"] = str(root / env["DATABASE_FOLDER"].lstrip("/"))
        env["API_HOST"] = "127.0.0.1"
        env["API_PORT"] = "0"
        env.pop("METRICS_PORT", None)
        env.pop("METRICS_HOST", None)
        if database_url is not None:
            env["DATABASE_URL"] = database_url
        for m in c["volumeMounts"]:
            if m["name"] == "keys":
                f = root / m["mountPath"].lstrip("/")
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_bytes(data[m["subPath"]])
                f.chmod(0o440)
        self.env = env
        self.log = open(root / "stderr.log", "w")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [binary, *c["args"]], env=env, cwd=root, stdout=subprocess.PIPE, stderr=self.log, text=True
        )
        self.lines: list[str] = []
        self.url: str | None = None
        self.started = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.append(line)
            t = line.strip()
            if t.startswith("listening on ") and self.url is None:
                self.url = t.removeprefix("listening on ").strip().replace("0.0.0.0", "127.0.0.1")
            if t.startswith("log in:"):
                self.started.set()
        self.started.set()

    def wait_started(self) -> str | None:
        """The problem, if it did not start."""
        if not self.started.wait(60) or self.url is None:
            log = (Path(self.dir.name) / "stderr.log").read_text()
            return f"the pod's container did not start: {''.join(self.lines)}{log[-3000:]}"
        return None

    def call(self, path: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(f"{self.url}{path}", method="POST" if body is not None else "GET")
        if body is not None:
            req.data = json.dumps(body).encode()
            req.add_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                text = r.read()
                return r.status, (json.loads(text) if text.strip().startswith(b"{") else {})
        except urllib.error.HTTPError as e:
            return e.code, {}
        except (urllib.error.URLError, TimeoutError, ConnectionError):
            return 0, {}

    def probe(self, problems: list[str], name: str) -> float:
        """Liveness and readiness as the kubelet asks them; seconds from start to ready."""
        deadline = time.monotonic() + 30
        for probe in ("livenessProbe", "readinessProbe"):
            path = self.container[probe]["httpGet"]["path"]
            if probe == "readinessProbe" and not served(path):
                # Until the server serves it, Kubernetes would never mark the pod Ready.
                print(f"check-helm: WARNING {name}: {path} is not a route of docs/openapi.json yet: not probed")
                continue
            # Poll until the answer is final (no listener yet, or 503 while starting).
            while (st := self.call(path)[0]) in (0, 503) and time.monotonic() < deadline:
                time.sleep(0.1)
            if st != 200:
                problems.append(f"{name}: the pod's {probe} GET {path} answered {st}")
        return time.monotonic() - self.t0

    def login(self) -> str | None:
        st, v = self.call("/api/v1/auth/token", {"username": "root", "password": self.env["ROOT_PASSWORD"]})
        return v.get("token") if st == 200 else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        self.dir.cleanup()


def run_pods(name: str, objs: list[dict], binary: str, problems: list[str]) -> str | None:
    """Run the chart's pods: one on the JSON engine; two sharing a fresh PostgreSQL database of
    the test services (HANGAR_TEST_POSTGRES_URL) with store.engine=sql. What was shown, or None."""
    if not any(o["kind"] == "Secret" for o in objs):
        return None
    dep = next(o for o in objs if o["kind"] == "Deployment")
    sql = any(e["name"] == "DATABASE_URL" for e in dep["spec"]["template"]["spec"]["containers"][0]["env"])
    db_url = None
    admin = os.environ.get("HANGAR_TEST_POSTGRES_URL")
    if sql:
        if not admin:
            return None
        db = f"hangar_helm_{os.getpid()}"
        psql = subprocess.run(["psql", admin, "-qc", f"CREATE DATABASE {db}"], capture_output=True, text=True)
        if psql.returncode != 0:
            problems.append(f"{name}: cannot make a database for the pods: {psql.stderr}")
            return None
        db_url = admin.rsplit("/", 1)[0] + "/" + db
    pods = [Pod(objs, binary, db_url) for _ in range(2 if sql else 1)]
    try:
        for i, p in enumerate(pods):
            if (why := p.wait_started()) is not None:
                try:
                    p.proc.wait(10)
                except subprocess.TimeoutExpired:
                    problems.append(f"{name}: {why}")
                    return None
                # The container exited: the kubelet restarts it (restartPolicy Always). Say so,
                # with the last line it wrote, and start it again once.
                last = (Path(p.dir.name) / "stderr.log").read_text().strip().splitlines()[-1:]
                print(f"check-helm: WARNING {name}: pod {i + 1} exited at its first start and was restarted: {last}")
                p.stop()
                pods[i] = p = Pod(objs, binary, db_url)
                if (why := p.wait_started()) is not None:
                    problems.append(f"{name}: {why}")
                    return None
        secs = max(p.probe(problems, name) for p in pods)
        token = pods[0].login()
        if token is None:
            problems.append(f"{name}: root cannot log in with the Secret's ROOT_PASSWORD")
            return None
        if not sql:
            return f"the pod's container (real binary) answered its probes {secs:.2f} s after start; root logged in"
        # Every pod must accept what another issued: the JWT secret and the API-key pepper are
        # the Secret's, and the store is the shared database.
        st, key = pods[0].call("/api/v1/auth/api_keys", {"name": "helm-check"}, {"Authorization": f"Bearer {token}"})
        if st != 201 or "encoded" not in key:
            problems.append(f"{name}: making an API key on pod 1 answered {st}")
            return None
        st1 = pods[1].call("/api/v1/version", headers={"Authorization": f"Bearer {token}"})[0]
        st2 = pods[1].call("/api/v1/version", headers={"X-Api-Key": key["encoded"]})[0]
        if (st1, st2) != (200, 200):
            problems.append(f"{name}: pod 2 refused pod 1's login token ({st1}) or API key ({st2})")
            return None
        return (
            f"two pods on one PostgreSQL database answered their probes {secs:.2f} s after start; "
            "a login token and an API key made on one are accepted by the other"
        )
    finally:
        for p in pods:
            p.stop()
        if db_url is not None and admin:
            subprocess.run(["psql", admin, "-qc", f"DROP DATABASE IF EXISTS {db_url.rsplit('/', 1)[1]}"],
                           capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", help="the hangar binary to run the pod's container with (none: render only)")
    args = ap.parse_args()
    binary = args.binary
    if binary and not os.access(binary, os.X_OK):
        print(f"check-helm: FAIL no executable hangar binary at {binary}", file=sys.stderr)
        return 1
    keys = config_keys()
    problems: list[str] = []
    counts = []
    pods: list[tuple[str, str]] = []
    for vf in sorted((CHART / "ci").glob("*-values.yaml")):
        t0 = time.monotonic()
        values = yaml.safe_load(vf.read_text()) or {}
        if vf.name not in EXPECT:
            problems.append(f"{vf.name}: no expectations in scripts/check-helm.py")
            continue
        lint = helm.lint(str(CHART), values, strict=True, namespace="ci", kube_version="v1.25.0")
        for m in lint.get("messages") or []:
            if m.get("severity", 0) >= 2:
                problems.append(f"{vf.name}: lint: {m.get('path')}: {m.get('error')}")
        for e in lint.get("errors") or []:
            problems.append(f"{vf.name}: lint: {e}")
        try:
            objs = render(values)
        except helm.HelmError as e:
            problems.append(f"{vf.name}: render failed: {e}")
            continue
        for o in objs:
            validate(o, problems, vf.name)
        check_promises(vf.name, values, objs, keys, problems)
        counts.append((vf.name, len(objs), time.monotonic() - t0))
        if binary:
            said = run_pods(vf.name, objs, binary, problems)
            if said is not None:
                pods.append((vf.name, said))
    for values, word in MUST_FAIL:
        try:
            render(values)
            problems.append(f"values {json.dumps(values)} rendered; they must fail")
        except helm.HelmError as e:
            if word not in str(e):
                problems.append(f"values {json.dumps(values)} failed without naming {word}: {e}")
    for name, n, secs in counts:
        print(f"check-helm: {name}: {n} objects rendered and valid (Kubernetes {', '.join(K8S_VERSIONS)}) in {secs:.2f} s")
    for name, said in pods:
        print(f"check-helm: {name}: {said}")
    if not binary:
        print("check-helm: no --binary: the pod's container was not run")
    if problems:
        for p in problems:
            print(f"check-helm: FAIL {p}", file=sys.stderr)
        return 1
    print(f"check-helm: {len(MUST_FAIL)} broken value sets refused, as they must be")
    return 0


if __name__ == "__main__":
    sys.exit(main())
