//! Single sign-on against a real OpenID provider (`tests/oidc/provider.mjs`, oidc-provider
//! from npm; `scripts/test.sh` runs `npm ci` there) and the real binary: the browser's code
//! flow driven over HTTP with a cookie jar (the provider's login and consent forms posted),
//! browser sessions with CSRF and the websocket origin check, tampered state and nonce, a
//! replayed callback, tokens from another issuer, expired or for another audience, just-in-time
//! users disabled when their group goes, client-credentials bearer tokens mapped or refused,
//! and `hangar login --sso` with the device grant.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use reqwest::{Method, Url};
use serde_json::{Value, json};

const CLIENT_SECRET: &str = "hangar-test-client-secret-0123456789";
const BOT_SECRET: &str = "ci-bot-test-secret-0123456789";
const ALICE_PASSWORD: &str = "alice-idp-password";
const BOB_PASSWORD: &str = "bob-idp-password";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running test provider.
struct Idp {
    child: Child,
    issuer: String,
}

impl Idp {
    fn start(dir: &Path, port: u16, config: Value) -> Idp {
        let script = repo_root().join("tests/oidc/provider.mjs");
        assert!(
            repo_root().join("tests/oidc/node_modules/oidc-provider").exists(),
            "tests/oidc/node_modules is missing: run `npm ci` in tests/oidc (scripts/test.sh does)"
        );
        let issuer = format!("http://127.0.0.1:{port}");
        let cfg = dir.join(format!("idp-{port}.json"));
        std::fs::write(&cfg, serde_json::to_vec(&config).unwrap()).unwrap();
        let log = std::fs::File::create(dir.join(format!("idp-{port}.log"))).unwrap();
        let mut child = Command::new("node")
            .arg(&script)
            .args(["--port", &port.to_string(), "--issuer", &issuer, "--config"])
            .arg(&cfg)
            .stdout(Stdio::piped())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("node runs (apt-get install nodejs)");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let idp = Idp { child, issuer: issuer.clone() };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "the test provider did not print READY");
            match rx.recv_timeout(left) {
                Ok(l) if l.trim() == format!("READY {issuer}") => break,
                Ok(_) => {}
                Err(e) => panic!("the test provider stopped before READY ({e}); see {}", dir.display()),
            }
        }
        idp
    }

    async fn set_groups(&self, user: &str, groups: &[&str]) {
        let r = client().post(format!("{}/test/users/{user}/groups", self.issuer)).json(&groups).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }

    async fn mint(&self, claims: Value) -> String {
        let v: Value = client()
            .post(format!("{}/test/mint", self.issuer))
            .json(&claims)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["token"].as_str().unwrap().to_string()
    }

    async fn client_credentials(&self, id: &str, secret: &str) -> String {
        let r = client()
            .post(format!("{}/token", self.issuer))
            .basic_auth(id, Some(secret))
            .form(&[("grant_type", "client_credentials"), ("resource", "urn:hangar"), ("scope", "hangar")])
            .send()
            .await
            .unwrap();
        let st = r.status();
        let v: Value = r.json().await.unwrap();
        assert_eq!(st, 200, "client credentials for {id}: {v}");
        v["access_token"].as_str().unwrap().to_string()
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn idp_config(hangar: &str, resource_aud: &str) -> Value {
    json!({
        "clients": [
            {"client_id": "hangar", "client_secret": CLIENT_SECRET,
             "redirect_uris": [format!("{hangar}/api/v1/auth/oidc/sso/callback")],
             "grant_types": ["authorization_code"], "response_types": ["code"]},
            // A native client: the device grant, and the code grant back to a loopback
            // listener on any port (`hangar login --sso --browser`).
            {"client_id": "hangar-cli", "token_endpoint_auth_method": "none", "application_type": "native",
             "redirect_uris": ["http://127.0.0.1/callback"], "response_types": ["code"],
             "grant_types": ["urn:ietf:params:oauth:grant-type:device_code", "authorization_code"]},
            {"client_id": "ci-bot", "client_secret": BOT_SECRET, "redirect_uris": [], "response_types": [],
             "grant_types": ["client_credentials"]},
            {"client_id": "ci-other", "client_secret": BOT_SECRET, "redirect_uris": [], "response_types": [],
             "grant_types": ["client_credentials"]}
        ],
        "users": [
            {"id": "alice-sub", "username": "alice", "password": ALICE_PASSWORD, "email": "alice@idp.example",
             "name": "Alice", "groups": ["hangar-admins"]},
            {"id": "bob-sub", "username": "bob", "password": BOB_PASSWORD, "email": "bob@idp.example",
             "name": "Bob", "groups": ["hangar-users"]}
        ],
        "resource": resource_aud
    })
}

/// Hangar with one provider, and the provider (started after, so it knows Hangar's URL).
async fn setup(dir: &Path) -> (Server, Idp) {
    let idp_port = free_port();
    let issuer = format!("http://127.0.0.1:{idp_port}");
    let s = Server::start(
        &dir.join("hangar"),
        &[
            ("OIDC_ISSUER_URL", issuer.as_str()),
            ("OIDC_CLIENT_ID", "hangar"),
            ("OIDC_CLIENT_SECRET", CLIENT_SECRET),
            ("OIDC_ROLE_MAP", "hangar-admins=SUPER_USER,hangar-users=USER,client_id:ci-bot=USER"),
            ("OIDC_AUDIENCE", "urn:hangar"),
            ("OIDC_CLI_CLIENT_ID", "hangar-cli"),
        ],
    );
    let idp = Idp::start(dir, idp_port, idp_config(&s.url, "urn:hangar"));
    (s, idp)
}

/// A browser: a cookie jar (cookies by name, every server on 127.0.0.1 as a browser would
/// share them across ports) and redirects followed by hand.
struct Browser {
    http: reqwest::Client,
    jar: HashMap<String, String>,
}

struct Page {
    status: u16,
    url: Url,
    location: Option<Url>,
    body: String,
}

impl Browser {
    fn new() -> Browser {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        Browser { http, jar: HashMap::new() }
    }

    fn cookie_header(&self) -> String {
        self.jar.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("; ")
    }

    async fn send(
        &mut self,
        method: Method,
        url: &Url,
        form: Option<&[(&str, &str)]>,
        headers: &[(&str, &str)],
    ) -> Page {
        let mut r = self.http.request(method, url.clone());
        if !self.jar.is_empty() {
            r = r.header("cookie", self.cookie_header());
        }
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        if let Some(f) = form {
            r = r.form(f);
        }
        let resp = r.send().await.unwrap();
        for sc in resp.headers().get_all("set-cookie") {
            let sc = sc.to_str().unwrap();
            let first = sc.split(';').next().unwrap();
            let (k, v) = first.split_once('=').unwrap();
            let gone = v.is_empty()
                || sc.to_ascii_lowercase().contains("max-age=0")
                || sc.to_ascii_lowercase().contains("expires=thu, 01 jan 1970");
            if gone {
                self.jar.remove(k.trim());
            } else {
                self.jar.insert(k.trim().to_string(), v.to_string());
            }
        }
        let status = resp.status().as_u16();
        let location = resp.headers().get("location").map(|l| url.join(l.to_str().unwrap()).unwrap());
        let body = resp.text().await.unwrap_or_default();
        Page { status, url: url.clone(), location, body }
    }

    async fn get(&mut self, url: &Url) -> Page {
        self.send(Method::GET, url, None, &[]).await
    }

    fn session(&self) -> Option<String> {
        self.jar.get("hangar_session").cloned()
    }
}

fn field(html: &str, name: &str) -> String {
    let at = html.find(&format!("name=\"{name}\" value=\"")).unwrap_or_else(|| panic!("no {name} in {html}"));
    let rest = &html[at + name.len() + 15..];
    rest[..rest.find('"').unwrap()].to_string()
}

#[derive(Clone, Copy, PartialEq)]
enum Tamper {
    None,
    /// The nonce of the authorization request is changed on its way to the provider.
    Nonce,
    /// The state of the callback is changed on its way back.
    State,
}

/// Follow a login from `start` through the provider's pages (posting the login and consent
/// forms) to Hangar's callback; the callback's answer.
async fn drive(b: &mut Browser, s: &Server, start: &str, user: &str, password: &str, tamper: Tamper) -> Page {
    drive_to(b, &format!("{}/api/v1/auth/oidc/", s.url), start, user, password, tamper).await
}

/// [`drive`] to the callback whose address starts with `back_to` (Hangar's, or the CLI's
/// loopback listener).
async fn drive_to(b: &mut Browser, back_to: &str, start: &str, user: &str, password: &str, tamper: Tamper) -> Page {
    let mut url = Url::parse(start).unwrap();
    let mut first_redirect = true;
    for _ in 0..30 {
        let is_callback = url.path().ends_with("/callback") && url.as_str().starts_with(back_to);
        if is_callback && tamper == Tamper::State {
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(k, v)| (k.to_string(), if k == "state" { format!("{v}x") } else { v.to_string() }))
                .collect();
            url.query_pairs_mut().clear().extend_pairs(pairs);
        }
        let page = b.get(&url).await;
        if is_callback {
            return page;
        }
        if let Some(loc) = page.location {
            let mut loc = loc;
            if first_redirect && tamper == Tamper::Nonce {
                let pairs: Vec<(String, String)> = loc
                    .query_pairs()
                    .map(|(k, v)| (k.to_string(), if k == "nonce" { format!("{v}x") } else { v.to_string() }))
                    .collect();
                loc.query_pairs_mut().clear().extend_pairs(pairs);
            }
            first_redirect = false;
            url = loc;
            continue;
        }
        assert_eq!(page.status, 200, "{} answered {}: {}", page.url, page.status, page.body);
        let next = if page.body.contains("id=\"login\"") {
            let action = page.url.join(&format!("/interaction/{}/login", interaction_uid(&page.url))).unwrap();
            b.send(Method::POST, &action, Some(&[("login", user), ("password", password)]), &[]).await
        } else if page.body.contains("id=\"consent\"") {
            let action = page.url.join(&format!("/interaction/{}/confirm", interaction_uid(&page.url))).unwrap();
            b.send(Method::POST, &action, Some(&[]), &[]).await
        } else {
            panic!("unexpected page {}: {}", page.url, page.body);
        };
        url = next.location.unwrap_or_else(|| panic!("no redirect after a form: {} {}", next.status, next.body));
    }
    panic!("the login did not reach the callback");
}

fn interaction_uid(u: &Url) -> String {
    u.path_segments().unwrap().nth(1).unwrap().to_string()
}

async fn call_with_cookie(
    s: &Server,
    b: &Browser,
    method: Method,
    path: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let c = client();
    let mut r = c.request(method, s.api(path)).header("cookie", b.cookie_header());
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.unwrap();
    let st = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (st, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

async fn login_url(s: &Server) -> String {
    let (st, v) = call(&client(), Method::GET, &s.api("/auth/providers"), &Auth::None, None, &[]).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v[0]["id"], "sso");
    format!("{}{}?return_to=/console/vms", s.url, v[0]["login_url"].as_str().unwrap())
}

#[tokio::test]
async fn browser_sso_sessions_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let (s, idp) = setup(dir.path()).await;
    let c = client();
    let root = Auth::Bearer(login(&c, &s, "root", ROOT_PASSWORD).await);
    let start = login_url(&s).await;

    // The code flow lands with a session of the mapped role.
    let mut alice = Browser::new();
    let cb = drive(&mut alice, &s, &start, "alice", ALICE_PASSWORD, Tamper::None).await;
    assert_eq!(cb.status, 302, "callback: {}", cb.body);
    assert_eq!(cb.location.as_ref().unwrap().path(), "/console/vms");
    assert!(alice.session().is_some(), "the session cookie is set");
    assert!(!alice.jar.contains_key("hangar_oidc"), "the state cookie is cleared");
    let (st, me) = call_with_cookie(&s, &alice, Method::GET, "/auth/session", None, &[]).await;
    assert_eq!(st, 200, "{me}");
    assert_eq!(me["user"]["username"], "alice");
    assert_eq!(me["auth"], "oidc");
    assert_eq!(me["provider"], "sso");
    assert_eq!(me["user"]["roles"], json!(["SUPER_USER"]));
    assert_eq!(me["user"]["external_provider"], "sso");
    let csrf = me["csrf_token"].as_str().unwrap().to_string();

    // A replayed callback finds its state used.
    let replay = alice.get(&cb.url).await;
    assert_eq!(replay.status, 400, "replayed callback: {}", replay.body);

    // CSRF: a cookie-authenticated POST needs the header; a wrong one is refused too.
    let key = json!({"name": "alice-key"});
    let (st, v) = call_with_cookie(&s, &alice, Method::POST, "/auth/api_keys", Some(key.clone()), &[]).await;
    assert_eq!((st, v["error"].as_str()), (403, Some("csrf")), "{v}");
    let (st, v) =
        call_with_cookie(&s, &alice, Method::POST, "/auth/api_keys", Some(key.clone()), &[("x-csrf-token", "nope")])
            .await;
    assert_eq!(st, 403, "{v}");
    let (st, v) =
        call_with_cookie(&s, &alice, Method::POST, "/auth/api_keys", Some(key), &[("x-csrf-token", &csrf)]).await;
    assert_eq!(st, 201, "with the CSRF token: {v}");

    // The websocket accepts the cookie from the server's own origin only.
    {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let ws_url = format!("{}/api/v1/ws/subscribe?event_types=health", s.url.replacen("http", "ws", 1));
        let host = s.url.trim_start_matches("http://").to_string();
        for (origin, ok) in [("http://evil.example", false), (s.url.as_str(), true)] {
            let mut req = ws_url.as_str().into_client_request().unwrap();
            req.headers_mut().insert("cookie", alice.cookie_header().parse().unwrap());
            req.headers_mut().insert("origin", origin.parse().unwrap());
            req.headers_mut().insert("host", host.parse().unwrap());
            match tokio_tungstenite::connect_async(req).await {
                Ok(_) => assert!(ok, "a cross-origin websocket by cookie was accepted"),
                Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                    assert!(!ok, "same-origin websocket refused: {}", resp.status());
                    assert_eq!(resp.status().as_u16(), 403);
                }
                Err(e) => panic!("websocket: {e}"),
            }
        }
    }

    // The external user has no password here.
    let (st, v) = call(
        &c,
        Method::POST,
        &s.api("/auth/token"),
        &Auth::None,
        Some(json!({"username": "alice", "password": ALICE_PASSWORD})),
        &[],
    )
    .await;
    assert_eq!(st, 403, "password login of an SSO user: {v}");

    // Tampered state and nonce are refused, and open no session.
    let mut b = Browser::new();
    let p = drive(&mut b, &s, &start, "bob", BOB_PASSWORD, Tamper::State).await;
    assert_eq!(p.status, 400, "tampered state: {}", p.body);
    assert!(b.session().is_none());
    let mut b = Browser::new();
    let p = drive(&mut b, &s, &start, "bob", BOB_PASSWORD, Tamper::Nonce).await;
    assert_eq!(p.status, 401, "tampered nonce: {}", p.body);
    assert!(p.body.contains("nonce"), "{}", p.body);
    assert!(b.session().is_none());
    // A callback in a browser that did not start the login (no state cookie).
    let mut b = Browser::new();
    let mut cb_url = None;
    {
        let mut url = Url::parse(&start).unwrap();
        let mut started = false;
        for _ in 0..30 {
            if url.path().ends_with("/callback") {
                cb_url = Some(url.clone());
                break;
            }
            let page = b.get(&url).await;
            if let Some(l) = page.location {
                if !started {
                    started = true;
                    b.jar.remove("hangar_oidc");
                }
                url = l;
                continue;
            }
            let uid = interaction_uid(&page.url);
            let next = if page.body.contains("id=\"login\"") {
                let a = page.url.join(&format!("/interaction/{uid}/login")).unwrap();
                b.send(Method::POST, &a, Some(&[("login", "bob"), ("password", BOB_PASSWORD)]), &[]).await
            } else {
                let a = page.url.join(&format!("/interaction/{uid}/confirm")).unwrap();
                b.send(Method::POST, &a, Some(&[]), &[]).await
            };
            url = next.location.unwrap();
        }
    }
    let p = b.get(&cb_url.unwrap()).await;
    assert_eq!(p.status, 400, "callback without the state cookie: {}", p.body);

    // A plain user: role USER, logout ends the session.
    let mut bob = Browser::new();
    let p = drive(&mut bob, &s, &start, "bob", BOB_PASSWORD, Tamper::None).await;
    assert_eq!(p.status, 302, "{}", p.body);
    let (st, me) = call_with_cookie(&s, &bob, Method::GET, "/auth/session", None, &[]).await;
    assert_eq!(st, 200);
    assert_eq!(me["user"]["roles"], json!(["USER"]));
    let bob_csrf = me["csrf_token"].as_str().unwrap().to_string();
    let (st, _) = call_with_cookie(&s, &bob, Method::GET, "/auth/users", None, &[]).await;
    assert_eq!(st, 403, "a USER session lists no users");
    let (st, _) = call_with_cookie(&s, &bob, Method::DELETE, "/auth/session", None, &[]).await;
    assert_eq!(st, 403, "logout without the CSRF token");
    let old_bob = bob.cookie_header();
    let p = bob
        .send(Method::DELETE, &Url::parse(&s.api("/auth/session")).unwrap(), None, &[("x-csrf-token", &bob_csrf)])
        .await;
    assert_eq!(p.status, 204, "{}", p.body);
    assert!(bob.session().is_none(), "the cookie is cleared");
    let (st, _) = c
        .get(s.api("/auth/session"))
        .header("cookie", old_bob)
        .send()
        .await
        .map(|r| (r.status().as_u16(), ()))
        .unwrap();
    assert_eq!(st, 401, "the logged-out session is gone from the store");

    // Just in time: alice's group goes; her next login is refused, she is disabled and her
    // open session dies at once.
    idp.set_groups("alice-sub", &[]).await;
    let mut again = Browser::new();
    let p = drive(&mut again, &s, &start, "alice", ALICE_PASSWORD, Tamper::None).await;
    assert_eq!(p.status, 403, "a login the mapping no longer grants: {}", p.body);
    let (st, _) = call_with_cookie(&s, &alice, Method::GET, "/auth/session", None, &[]).await;
    assert_eq!(st, 401, "the disabled user's session is dead");
    let (st, u) = call(&c, Method::GET, &s.api("/auth/users/alice"), &root, None, &[]).await;
    assert_eq!(st, 200);
    assert_eq!(u["disabled"], true, "{u}");
    let (st, audit) = call(&c, Method::GET, &s.api("/audit?limit=1000"), &root, None, &[]).await;
    assert_eq!(st, 200);
    let actions: Vec<&str> = audit
        .as_array()
        .or_else(|| audit["entries"].as_array())
        .map(|a| a.iter().filter_map(|e| e["action"].as_str()).collect())
        .unwrap_or_default();
    assert!(actions.contains(&"user.sso_disabled"), "{actions:?}");

    // Machines: a client-credentials access token, mapped or not.
    let bot = Auth::Bearer(idp.client_credentials("ci-bot", BOT_SECRET).await);
    let (st, v) = call(&c, Method::GET, &s.api("/auth/api_keys"), &bot, None, &[]).await;
    assert_eq!(st, 200, "a mapped machine token: {v}");
    let (st, _) = call(&c, Method::GET, &s.api("/auth/users"), &bot, None, &[]).await;
    assert_eq!(st, 403, "the machine holds USER only");
    let other = Auth::Bearer(idp.client_credentials("ci-other", BOT_SECRET).await);
    let (st, v) = call(&c, Method::GET, &s.api("/auth/api_keys"), &other, None, &[]).await;
    assert_eq!(st, 403, "an unmapped machine: {v}");

    // Expired, foreign-audience and not-yet-valid tokens of the right issuer and key.
    let now = chrono::Utc::now().timestamp();
    let base = json!({"iss": idp.issuer, "sub": "ci-bot", "client_id": "ci-bot", "aud": "urn:hangar", "iat": now, "exp": now + 300});
    let good = idp.mint(base.clone()).await;
    let (st, v) = call(&c, Method::GET, &s.api("/auth/api_keys"), &Auth::Bearer(good), None, &[]).await;
    assert_eq!(st, 200, "a minted valid token (the control): {v}");
    for (what, patch) in [
        ("expired", json!({"iat": now - 600, "exp": now - 300})),
        ("another audience", json!({"aud": "urn:someone-else"})),
        ("not valid yet", json!({"nbf": now + 600})),
    ] {
        let mut claims = base.clone();
        for (k, v) in patch.as_object().unwrap() {
            claims[k] = v.clone();
        }
        let t = idp.mint(claims).await;
        let (st, v) = call(&c, Method::GET, &s.api("/auth/api_keys"), &Auth::Bearer(t), None, &[]).await;
        assert_eq!(st, 401, "{what}: {v}");
    }

    // Another issuer: its own tokens, and tokens it signs claiming our issuer.
    let other_port = free_port();
    let other_idp = Idp::start(dir.path(), other_port, idp_config(&s.url, "urn:hangar"));
    let foreign = other_idp.client_credentials("ci-bot", BOT_SECRET).await;
    let (st, v) = call(&c, Method::GET, &s.api("/auth/api_keys"), &Auth::Bearer(foreign), None, &[]).await;
    assert_eq!(st, 401, "another issuer's access token: {v}");
    let forged = other_idp.mint(base.clone()).await;
    let (st, v) = call(&c, Method::GET, &s.api("/auth/api_keys"), &Auth::Bearer(forged), None, &[]).await;
    assert_eq!(st, 401, "another issuer's key claiming ours: {v}");
    let id_token = other_idp
        .mint(json!({"iss": other_idp.issuer, "sub": "bob-sub", "aud": "hangar-cli", "iat": now, "exp": now + 300, "groups": ["hangar-admins"]}))
        .await;
    let (st, v) = call(
        &c,
        Method::POST,
        &s.api("/auth/oidc/sso/token-exchange"),
        &Auth::None,
        Some(json!({"id_token": id_token})),
        &[],
    )
    .await;
    assert_eq!(st, 401, "another issuer's ID token: {v}");
    // The same exchange with our provider's ID token works (the control).
    let id_token = idp
        .mint(json!({"iss": idp.issuer, "sub": "bob-sub", "aud": "hangar-cli", "iat": now, "exp": now + 300, "groups": ["hangar-users"]}))
        .await;
    let (st, v) = call(
        &c,
        Method::POST,
        &s.api("/auth/oidc/sso/token-exchange"),
        &Auth::None,
        Some(json!({"id_token": id_token})),
        &[],
    )
    .await;
    assert_eq!(st, 200, "our provider's ID token: {v}");

    // Local logins and their tokens keep working beside OIDC.
    let (st, _) = call(&c, Method::GET, &s.api("/auth/users"), &root, None, &[]).await;
    assert_eq!(st, 200);
}

#[tokio::test]
async fn password_sessions_end_with_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let (uid, _) = make_user(&c, &s, &root, "carol").await;
    let mut b = Browser::new();
    let url = Url::parse(&s.api("/auth/session")).unwrap();
    let bad = b.http.post(url.clone()).json(&json!({"username": "carol", "password": "wrong"})).send().await.unwrap();
    assert_eq!(bad.status(), 401);
    let r =
        b.http.post(url.clone()).json(&json!({"username": "carol", "password": USER_PASSWORD})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let set = r.headers().get("set-cookie").unwrap().to_str().unwrap().to_string();
    assert!(set.starts_with("hangar_session="), "{set}");
    for attr in ["HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(set.contains(attr), "{set} lacks {attr}");
    }
    assert!(!set.contains("Secure"), "plain HTTP: no Secure");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["user"]["username"], "carol");
    b.jar.insert("hangar_session".into(), set.split(';').next().unwrap()["hangar_session=".len()..].to_string());
    let (st, me) = call_with_cookie(&s, &b, Method::GET, "/auth/session", None, &[]).await;
    assert_eq!((st, me["auth"].as_str()), (200, Some("local")), "{me}");
    assert_eq!(me["csrf_token"], v["csrf_token"]);
    // A bearer token is never CSRF-checked.
    let (st, _) =
        call(&c, Method::POST, &s.api("/auth/api_keys"), &Auth::Bearer(root.clone()), Some(json!({"name": "r"})), &[])
            .await;
    assert_eq!(st, 201);
    // A password reset by an administrator ends the session at its next request.
    let (st, _) = call(
        &c,
        Method::PUT,
        &s.api(&format!("/auth/users/{uid}")),
        &Auth::Bearer(root),
        Some(json!({"password": "Another-Passw0rd!-x"})),
        &[],
    )
    .await;
    assert_eq!(st, 200);
    let (st, _) = call_with_cookie(&s, &b, Method::GET, "/auth/session", None, &[]).await;
    assert_eq!(st, 401, "the session died with the password");
}

/// `hangar` with `args` and its config in `home`; its stderr, line by line.
fn spawn_cli(args: &[&str], home: &Path) -> (Child, mpsc::Receiver<String>) {
    std::fs::create_dir_all(home).unwrap();
    let mut cli = Command::new(bin())
        .args(args)
        .env("HANGAR_CONFIG_DIR", home)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let err = cli.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (cli, rx)
}

#[tokio::test]
async fn cli_login_sso_with_the_device_grant() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _idp) = setup(dir.path()).await;
    let home = dir.path().join("cli");
    let (mut cli, rx) = spawn_cli(&["login", "--sso", "--url", &s.url], &home);
    let mut uri = None;
    let mut code = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while uri.is_none() {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("the CLI shows a code");
        if let Some(rest) = line.strip_prefix("To sign in, open ") {
            let (u, c) = rest.split_once(" and enter the code ").unwrap();
            uri = Some(u.to_string());
            code = Some(c.trim().to_string());
        }
    }
    // The test plays the user in the provider's device pages.
    let mut b = Browser::new();
    let device = Url::parse(&uri.unwrap()).unwrap();
    let page = b.get(&device).await;
    assert_eq!(page.status, 200, "{}", page.body);
    let xsrf = field(&page.body, "xsrf");
    let code = code.unwrap();
    let page = b.send(Method::POST, &device, Some(&[("xsrf", &xsrf), ("user_code", &code)]), &[]).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("device-confirm"), "{}", page.body);
    let xsrf = field(&page.body, "xsrf");
    let mut p =
        b.send(Method::POST, &device, Some(&[("xsrf", &xsrf), ("user_code", &code), ("confirm", "yes")]), &[]).await;
    for _ in 0..20 {
        if let Some(l) = p.location.clone() {
            p = b.get(&l).await;
            continue;
        }
        if p.body.contains("device-done") {
            break;
        }
        let uid = interaction_uid(&p.url);
        p = if p.body.contains("id=\"login\"") {
            let a = p.url.join(&format!("/interaction/{uid}/login")).unwrap();
            b.send(Method::POST, &a, Some(&[("login", "alice"), ("password", ALICE_PASSWORD)]), &[]).await
        } else if p.body.contains("id=\"consent\"") {
            let a = p.url.join(&format!("/interaction/{uid}/confirm")).unwrap();
            b.send(Method::POST, &a, Some(&[]), &[]).await
        } else {
            panic!("unexpected device page {}: {}", p.url, p.body);
        };
    }
    assert!(p.body.contains("device-done"), "{}", p.body);
    // The CLI polls and finishes.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = cli.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the CLI did not finish");
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            eprintln!("cli: {l}");
        }
    };
    let mut out = String::new();
    std::io::Read::read_to_string(&mut cli.stdout.take().unwrap(), &mut out).unwrap();
    assert!(status.success(), "hangar login --sso: {status} {out}");
    let creds: Value = serde_json::from_slice(&std::fs::read(home.join("credentials.json")).unwrap()).unwrap();
    assert_eq!(creds["username"], "alice", "{creds}");
    let token = creds["token"].as_str().unwrap();
    let (st, me) = call(&client(), Method::GET, &s.api("/auth/me"), &Auth::Bearer(token.into()), None, &[]).await;
    assert_eq!(st, 200);
    assert_eq!(me["roles"], json!(["SUPER_USER"]));
}

/// `hangar login --sso --browser`: the code grant with PKCE in a browser on this machine,
/// back to the CLI's one-time listener on 127.0.0.1; a return with another state is refused.
#[tokio::test]
async fn cli_login_sso_in_a_browser_on_this_machine() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _idp) = setup(dir.path()).await;
    // Starts the CLI; the address it asks the user to open, and its stderr lines.
    let start = |home: &Path| {
        let (cli, rx) = spawn_cli(&["login", "--sso", "--browser", "--url", &s.url], home);
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = loop {
            let line =
                rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("the CLI shows a URL");
            if let Some(u) = line.strip_prefix("To sign in, open this address in a browser on this machine: ") {
                break Url::parse(u.trim()).unwrap();
            }
        };
        (cli, rx, url)
    };
    let finish = |cli: &mut Child, rx: &mpsc::Receiver<String>| {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut said = Vec::new();
        let status = loop {
            if let Some(st) = cli.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "the CLI did not finish");
            if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
                said.push(l);
            }
        };
        // Everything it printed, up to the end of its stderr.
        while let Ok(l) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            said.push(l);
        }
        (status, said.join("\n"))
    };

    // The test plays the user: the provider's login and consent pages, then the redirect
    // to the CLI's listener.
    let home = dir.path().join("cli");
    let (mut cli, rx, url) = start(&home);
    let q: HashMap<String, String> = url.query_pairs().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    assert_eq!(q.get("code_challenge_method").map(String::as_str), Some("S256"), "{url}");
    assert!(q["redirect_uri"].starts_with("http://127.0.0.1:"), "{url}");
    let mut b = Browser::new();
    let back = drive_to(&mut b, &q["redirect_uri"], url.as_str(), "alice", ALICE_PASSWORD, Tamper::None).await;
    assert!(back.body.contains("return to your terminal"), "{}", back.body);
    let (status, said) = finish(&mut cli, &rx);
    assert!(status.success(), "hangar login --sso --browser: {status} {said}");
    let creds: Value = serde_json::from_slice(&std::fs::read(home.join("credentials.json")).unwrap()).unwrap();
    assert_eq!(creds["username"], "alice", "{creds}");
    let (st, me) = call(
        &client(),
        Method::GET,
        &s.api("/auth/me"),
        &Auth::Bearer(creds["token"].as_str().unwrap().into()),
        None,
        &[],
    )
    .await;
    assert_eq!(st, 200, "{me}");
    assert_eq!(me["roles"], json!(["SUPER_USER"]));

    // A return that is not this login's (another state) ends the login with no credentials.
    let home = dir.path().join("cli-2");
    let (mut cli, rx, url) = start(&home);
    let q: HashMap<String, String> = url.query_pairs().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let forged = format!("{}?code=forged&state=not-{}", q["redirect_uri"], q["state"]);
    let r = client().get(&forged).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let (status, said) = finish(&mut cli, &rx);
    assert!(!status.success(), "a forged return was taken: {said}");
    assert!(said.contains("state"), "{said}");
    assert!(!home.join("credentials.json").exists());
}
