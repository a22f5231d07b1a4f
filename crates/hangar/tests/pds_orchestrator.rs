//! The reference's per-host orchestrator routes (issue 13): the reverse proxy of one host
//! (`/orchestrator/hosts/{id}/reverse-proxy/...`) as the Terraform provider and the VS Code
//! extension send it (ports as strings), the host cache (`/cache`, `/catalog/cache` and their
//! per-host forms, deletes answering 202), and `POST /orchestrator/hosts/{id}/machines/register`.
//! A real orchestrator and a real host agent (fake prlctl) on loopback.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::{Value, json};

/// An orchestrator with one host agent that runs the catalog and reverse_proxy modules,
/// registered as `host-a` with root's credentials.
async fn fleet(c: &reqwest::Client, dir: &Path) -> OneHostFleet {
    let fake = FakeParallels::new(&dir.join("a"));
    let agent = fake.agent(
        &dir.join("a/data"),
        &[("ENABLED_MODULES", "api,host,catalog,reverse_proxy"), ("SYSTEM_RESERVED_CPU", "0")],
    );
    let orch = Server::start(
        &dir.join("orch"),
        &[("ENABLED_MODULES", "api,orchestrator"), ("ORCHESTRATOR_CHECK_INTERVAL", "1s")],
    );
    let root = login(c, &orch, "root", ROOT_PASSWORD).await;
    let (st, h) = register_host(c, &orch, &Auth::Bearer(root.clone()), &agent).await;
    assert_eq!(st, 201, "register the host: {h}");
    OneHostFleet { fake, agent, orch, root }
}

/// `/orchestrator/hosts/host-a` + `path` on the orchestrator.
fn on_host(f: &OneHostFleet, path: &str) -> String {
    f.orch.api(&format!("/orchestrator/hosts/host-a{path}"))
}

/// A user with `claims` on the orchestrator: its token.
async fn user_with(c: &reqwest::Client, s: &Server, root: &str, name: &str, claims: &[&str]) -> String {
    let body = json!({"username": name, "email": format!("{name}@example.test"), "password": USER_PASSWORD,
        "claims": claims});
    let (st, v) = call(c, Method::POST, &s.api("/auth/users"), &Auth::Bearer(root.into()), Some(body), &[]).await;
    assert_eq!(st, 201, "create {name}: {v}");
    login(c, s, name, USER_PASSWORD).await
}

/// Every per-host reverse-proxy call, with the bodies the Terraform provider and the VS Code
/// extension send (ports as strings): the route made through the orchestrator really carries
/// traffic on the host, and each change shows on the host's own API.
#[tokio::test]
async fn per_host_reverse_proxy_as_the_clients_send_it() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let f = fleet(&c, dir.path()).await;
    let ra = Auth::Bearer(f.root.clone());
    let on_agent = Auth::Bearer(login(&c, &f.agent, "root", ROOT_PASSWORD).await);
    let (up, seen) = echo_upstream().await;

    let (st, cfg) = call(&c, Method::GET, &on_host(&f, "/reverse-proxy"), &ra, None, &[]).await;
    assert_eq!(st, 200, "{cfg}");
    assert!(cfg["hosts"].as_array().unwrap().is_empty(), "{cfg}");
    assert_eq!(cfg["enabled"], true, "{cfg}");

    // Terraform's shape: port and target_port as strings, scheme spelled `schema`.
    let body = json!({"host": "127.0.0.1", "port": "0", "name": "web",
        "http_routes": [{"path": "/", "target_host": "127.0.0.1", "target_port": up.to_string(), "schema": "http",
            "pattern": "", "target_vm_id": "", "request_headers": {"X-Via": "orchestrator"}, "response_headers": {}}]});
    let (st, h) = call(&c, Method::POST, &on_host(&f, "/reverse-proxy/hosts"), &ra, Some(body), &[]).await;
    assert_eq!(st, 201, "{h}");
    let id = h["id"].as_str().unwrap().to_string();
    let route_id = h["http_routes"][0]["id"].as_str().unwrap().to_string();
    let addr = h["listener"]["local_address"].as_str().expect("the listener runs on the host").to_string();
    assert_eq!(h["http_routes"][0]["target_port"], up.to_string(), "ports are texts, as the reference's: {h}");

    // The route carries traffic: a request to the host's listener reaches the upstream.
    let r = c.get(format!("http://{addr}/through/the/proxy")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let echoed: Value = r.json().await.unwrap();
    assert_eq!(echoed["path"], "/through/the/proxy", "{echoed}");
    assert_eq!(echoed["headers"]["x-via"], "orchestrator", "{echoed}");
    assert_eq!(seen.lock().unwrap().len(), 1);

    // The host's own API shows what the orchestrator made.
    let (st, local) =
        call(&c, Method::GET, &f.agent.api(&format!("/reverse-proxy/hosts/{id}")), &on_agent, None, &[]).await;
    assert_eq!(st, 200, "{local}");
    assert_eq!(local["name"], "web");

    let (st, list) = call(&c, Method::GET, &on_host(&f, "/reverse-proxy/hosts"), &ra, None, &[]).await;
    assert_eq!(st, 200, "{list}");
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let (st, one) = call(&c, Method::GET, &on_host(&f, &format!("/reverse-proxy/hosts/{id}")), &ra, None, &[]).await;
    assert_eq!((st, one["id"].as_str()), (200, Some(id.as_str())), "{one}");

    // A second route (upsert), then its delete (202).
    let route = json!({"path": "/two", "target_host": "127.0.0.1", "target_port": up.to_string(), "schema": "http"});
    let url = on_host(&f, &format!("/reverse-proxy/hosts/{id}/http_routes"));
    let (st, h2) = call(&c, Method::POST, &url, &ra, Some(route), &[]).await;
    assert_eq!(st, 200, "{h2}");
    assert_eq!(h2["http_routes"].as_array().unwrap().len(), 2, "{h2}");
    let url = on_host(&f, &format!("/reverse-proxy/hosts/{id}/http_routes/{route_id}"));
    let (st, v) = call(&c, Method::DELETE, &url, &ra, None, &[]).await;
    assert_eq!(st, 202, "{v}");
    let (_, one) = call(&c, Method::GET, &on_host(&f, &format!("/reverse-proxy/hosts/{id}")), &ra, None, &[]).await;
    assert_eq!(one["http_routes"].as_array().unwrap().len(), 1, "{one}");
    assert_eq!(one["http_routes"][0]["path"], "/two", "{one}");

    // Update (PUT) with the name changed, port still a string.
    let body = json!({"host": "127.0.0.1", "port": "0", "name": "web-2",
        "http_routes": [{"path": "/", "target_host": "127.0.0.1", "target_port": up.to_string()}]});
    let (st, h3) =
        call(&c, Method::PUT, &on_host(&f, &format!("/reverse-proxy/hosts/{id}")), &ra, Some(body), &[]).await;
    assert_eq!((st, h3["name"].as_str()), (200, Some("web-2")), "{h3}");

    // A TCP host: its tcp_route set through the orchestrator, target_port as a string.
    let body = json!({"host": "127.0.0.1", "port": "0", "name": "ssh"});
    let (st, t) = call(&c, Method::POST, &on_host(&f, "/reverse-proxy/hosts"), &ra, Some(body), &[]).await;
    assert_eq!(st, 201, "{t}");
    let tid = t["id"].as_str().unwrap().to_string();
    let tcp = json!({"target_host": "127.0.0.1", "target_port": up.to_string()});
    let url = on_host(&f, &format!("/reverse-proxy/hosts/{tid}/tcp_route"));
    let (st, t) = call(&c, Method::POST, &url, &ra, Some(tcp), &[]).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["tcp_route"]["target_port"], up.to_string(), "{t}");
    let taddr = t["listener"]["local_address"].as_str().expect("the TCP listener runs").to_string();
    let r = c.get(format!("http://{taddr}/over/tcp")).send().await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["path"], "/over/tcp", "the TCP route forwards");

    // disable / enable / restart (202 each), seen on the host.
    for (verb, enabled) in [("disable", false), ("enable", true), ("restart", true)] {
        let (st, v) = call(&c, Method::PUT, &on_host(&f, &format!("/reverse-proxy/{verb}")), &ra, None, &[]).await;
        assert_eq!(st, 202, "{verb}: {v}");
        let (_, cfg) = call(&c, Method::GET, &f.agent.api("/reverse-proxy"), &on_agent, None, &[]).await;
        assert_eq!(cfg["enabled"], enabled, "after {verb}: {cfg}");
    }

    // Delete (202): gone on the host; a second delete is the host's 404.
    let url = on_host(&f, &format!("/reverse-proxy/hosts/{tid}"));
    let (st, v) = call(&c, Method::DELETE, &url, &ra, None, &[]).await;
    assert_eq!(st, 202, "{v}");
    let (st, v) = call(&c, Method::DELETE, &url, &ra, None, &[]).await;
    assert_eq!(st, 404, "{v}");
    let (_, list) = call(&c, Method::GET, &f.agent.api("/reverse-proxy/hosts"), &on_agent, None, &[]).await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");

    // Bad input is refused here, as on the host, before anything is forwarded.
    let (st, v) =
        call(&c, Method::POST, &on_host(&f, "/reverse-proxy/hosts"), &ra, Some(json!({"port": "eighty"})), &[]).await;
    assert_eq!(st, 422, "{v}");
}

/// Who may not: a user without the route's claim (403), an unknown host (404), a host
/// whose required roles the caller lacks (403), for the reverse proxy, the cache and register.
#[tokio::test]
async fn per_host_routes_refuse_as_the_vm_routes_do() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let f = fleet(&c, dir.path()).await;
    let ra = Auth::Bearer(f.root.clone());
    let plain = Auth::Bearer(make_user(&c, &f.orch, &f.root, "plain").await.1);
    let ops = Auth::Bearer(
        user_with(&c, &f.orch, &f.root, "ops", &["LIST_REVERSE_PROXY_HOSTS", "CONFIGURE_REVERSE_PROXY", "LIST_CACHE"])
            .await,
    );

    for path in ["/reverse-proxy", "/reverse-proxy/hosts", "/cache", "/catalog/cache"] {
        // A plain user may list the cache (its USER role holds LIST_CACHE), not the proxy.
        let (st, v) = call(&c, Method::GET, &on_host(&f, path), &plain, None, &[]).await;
        let expected = if path.contains("cache") { 200 } else { 403 };
        assert_eq!(st, expected, "{path} as a plain user: {v}");
        if path.contains("cache") {
            let (st, v) = call(&c, Method::DELETE, &on_host(&f, path), &plain, None, &[]).await;
            assert_eq!(st, 403, "DELETE {path} without DELETE_ALL_CACHE: {v}");
        }
        let (st, v) = call(&c, Method::GET, &on_host(&f, path), &ops, None, &[]).await;
        assert_eq!(st, 200, "{path} with the claim: {v}");
        let url = f.orch.api(&format!("/orchestrator/hosts/no-such-host{path}"));
        let (st, v) = call(&c, Method::GET, &url, &ra, None, &[]).await;
        assert_eq!(st, 404, "{path} on an unknown host: {v}");
    }
    let (st, v) = call(&c, Method::DELETE, &on_host(&f, "/cache"), &ops, None, &[]).await;
    assert_eq!(st, 403, "delete needs DELETE_ALL_CACHE: {v}");
    let (st, v) =
        call(&c, Method::POST, &on_host(&f, "/reverse-proxy/hosts"), &ops, Some(json!({"port": "0"})), &[]).await;
    assert_eq!(st, 403, "create needs CREATE_REVERSE_PROXY_HOST: {v}");
    let (st, v) =
        call(&c, Method::POST, &on_host(&f, "/machines/register"), &plain, Some(json!({"path": "/x.pvm"})), &[]).await;
    assert_ne!(st, 200, "{v}");

    // The host now requires a role `ops` does not hold.
    let url = f.orch.api("/orchestrator/hosts/host-a");
    let (st, v) = call(&c, Method::PUT, &url, &ra, Some(json!({"required_roles": ["SUPER_USER"]})), &[]).await;
    assert_eq!(st, 200, "{v}");
    for path in ["/reverse-proxy", "/reverse-proxy/hosts", "/cache", "/catalog/cache"] {
        let (st, v) = call(&c, Method::GET, &on_host(&f, path), &ops, None, &[]).await;
        assert_eq!(st, 403, "{path} on a host ops may not use: {v}");
        let (st, v) = call(&c, Method::GET, &on_host(&f, path), &ra, None, &[]).await;
        assert_eq!(st, 200, "{path} as root: {v}");
    }
}

/// The host cache: `/cache` is the alias of `/catalog/cache`, deletes answer 202 (the VS Code
/// extension expects it), on the host and per host through the orchestrator.
#[tokio::test]
async fn cache_routes_and_their_per_host_forms() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let f = fleet(&c, dir.path()).await;
    let ra = Auth::Bearer(f.root.clone());
    let on_agent = Auth::Bearer(login(&c, &f.agent, "root", ROOT_PASSWORD).await);

    for url in
        [f.agent.api("/cache"), f.agent.api("/catalog/cache"), on_host(&f, "/cache"), on_host(&f, "/catalog/cache")]
    {
        let auth = if url.starts_with(&f.agent.url) { &on_agent } else { &ra };
        let (st, v) = call(&c, Method::GET, &url, auth, None, &[]).await;
        assert_eq!(st, 200, "{url}: {v}");
        assert_eq!(v["total_size"], 0, "{url}: {v}");
        assert!(v["manifests"].as_array().unwrap().is_empty(), "{url}: {v}");
        let (st, v) = call(&c, Method::DELETE, &url, auth, None, &[]).await;
        assert_eq!(st, 202, "DELETE {url}: {v}");
    }
    // One catalog id, one version: the host decides (nothing cached: its answer passes through
    // unchanged on the per-host form).
    for tail in ["/ubuntu", "/ubuntu/v1"] {
        let (local, _) = call(&c, Method::DELETE, &f.agent.api(&format!("/cache{tail}")), &on_agent, None, &[]).await;
        let (st, v) = call(&c, Method::DELETE, &on_host(&f, &format!("/cache{tail}")), &ra, None, &[]).await;
        assert_eq!(st, local, "per host as on the host ({tail}): {v}");
        let (st2, v) = call(&c, Method::DELETE, &on_host(&f, &format!("/catalog/cache{tail}")), &ra, None, &[]).await;
        assert_eq!(st2, local, "{v}");
        assert!(local == 202 || local == 404, "{local}");
    }
}

/// `POST /orchestrator/hosts/{id}/machines/register`: the bundle is registered on that host,
/// owned by the caller, and the orchestrator lists it there.
#[tokio::test]
async fn register_on_a_named_host() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let f = fleet(&c, dir.path()).await;
    let ra = Auth::Bearer(f.root.clone());
    f.fake.prlctl(&["create", "loose", "--distribution", "ubuntu"]);
    f.fake.prlctl(&["unregister", "loose"]);
    let bundle = f.fake.state.join("Parallels/loose.pvm");

    let body = json!({"path": bundle, "machine_name": "registered"});
    let (st, v) = call(&c, Method::POST, &on_host(&f, "/machines/register"), &ra, Some(body), &[]).await;
    assert_eq!(st, 200, "{v}");
    let id = v["ID"].as_str().or(v["id"].as_str()).expect("the VM's id").to_string();
    wait_for("the orchestrator to list the registered VM", Duration::from_secs(20), || async {
        let (_, list) = call(&c, Method::GET, &on_host(&f, "/machines"), &ra, None, &[]).await;
        list.to_string().contains(&id)
    })
    .await;
    let (st, m) = call(&c, Method::GET, &on_host(&f, &format!("/machines/{id}")), &ra, None, &[]).await;
    assert_eq!(st, 200, "{m}");
    assert_eq!(m["host"], "host-a", "{m}");
}
