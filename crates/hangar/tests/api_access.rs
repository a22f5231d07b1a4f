//! Every route, four callers, checked against the route's declared access; spoofed
//! privilege headers; the committed OpenAPI document; a table of bad inputs.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;

use common::*;
use hangar_core::claims::{DEFAULT_USER_CLAIMS, USER_ROLE};
use hangar_core::{AuthMethod, Decision, Principal};
use reqwest::Method;
use serde_json::{Value, json};

fn concrete(path: &str) -> String {
    // Parameters get ids that do not exist: an allowed caller then sees 404/4xx from the
    // handler, a refused one sees 401/403 from the authorisation layer.
    let mut out = String::new();
    let mut rest = path;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').map(|e| start + e).unwrap_or(rest.len() - 1);
        let name = &rest[start + 1..end];
        out.push_str(if name.starts_with('*') { "index.html" } else { "no-such-id" });
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn user_principal() -> Principal {
    Principal {
        user_id: "u".into(),
        username: "u".into(),
        email: "u@x".into(),
        roles: BTreeSet::from([USER_ROLE.to_string()]),
        claims: DEFAULT_USER_CLAIMS.iter().map(|s| s.to_string()).collect(),
        method: AuthMethod::Jwt,
    }
}

#[tokio::test]
async fn every_route_answers_as_its_declared_access_says() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let (_uid, user) = make_user(&c, &s, &root, "plainuser").await;
    let (st, key) =
        call(&c, Method::POST, &s.api("/auth/api_keys"), &Auth::Bearer(user.clone()), Some(json!({"name": "k1"})), &[])
            .await;
    assert_eq!(st, 201, "{key}");
    let user_key = key["encoded"].as_str().unwrap().to_string();

    let table = hangar_api::access_table();
    assert!(table.routes.len() > 30, "the table lists every route");
    let callers = [
        ("anonymous", Auth::None, None),
        ("USER", Auth::Bearer(user.clone()), Some(user_principal())),
        ("USER's API key", Auth::ApiKey(user_key.clone()), Some(user_principal())),
        ("SUPER_USER", Auth::Bearer(root.clone()), None),
    ];
    let mut checked = 0;
    for ((method, path), access) in &table.routes {
        let url = if path.starts_with("/swagger") || path.starts_with("/.well-known") {
            format!("{}{}", s.url, concrete(path))
        } else {
            s.api(&concrete(path))
        };
        let m: Method = method.parse().unwrap();
        for (who, auth, principal) in &callers {
            let body = matches!(m, Method::POST | Method::PUT | Method::PATCH).then(|| json!({}));
            let (st, v) = call(&c, m.clone(), &url, auth, body, &[]).await;
            let expected = match (who, principal) {
                (&"SUPER_USER", _) => Decision::Allow,
                (_, Some(p)) => access.check(Some(p)),
                (_, None) => access.check(None),
            };
            match expected {
                Decision::Allow => assert!(
                    st != 401 && st != 403,
                    "{who} {method} {path}: declared {access:?} allows it, got {st} {v}"
                ),
                Decision::Unauthenticated => assert_eq!(st, 401, "{who} {method} {path}: expected 401, got {st} {v}"),
                Decision::Forbidden { .. } => assert_eq!(st, 403, "{who} {method} {path}: expected 403, got {st} {v}"),
            }
            if st >= 400 {
                assert_eq!(v["code"].as_u64(), Some(st as u64), "{who} {method} {path}: error body {v}");
                assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, table.routes.len() * 4);

    // Every documented operation is in the access table, and every API route of the table
    // is documented: a route cannot be added without a declaration.
    let (_, doc) = call(&c, Method::GET, &s.api("/openapi.json"), &Auth::None, None, &[]).await;
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for m in ["get", "put", "post", "delete", "patch"] {
            if let Some(op) = item.get(m) {
                assert!(op.get("x-hangar-access").is_some(), "{m} {path} has no documented access");
                documented.insert((m.to_uppercase(), path.clone()));
            }
        }
    }
    for (m, p) in table.routes.keys() {
        if p.starts_with("/swagger") || p == "/openapi.json" || p.starts_with("/.well-known") {
            continue;
        }
        assert!(documented.contains(&(m.clone(), p.clone())), "{m} {p} is routed but not documented");
    }
    assert_eq!(documented.len() + 5, table.routes.len(), "documented operations and declared routes differ");
}

#[tokio::test]
async fn spoofed_privilege_headers_give_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let (_uid, user) = make_user(&c, &s, &root, "spoofer").await;
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let claims = b64("LIST_USER,CREATE_USER,DELETE_USER,UPDATE_USER");
    let roles = b64("SUPER_USER");
    let spoof: Vec<(&str, &str)> = vec![
        ("X-Super-User", "true"),
        ("X-Claims", claims.as_str()),
        ("X-Roles", roles.as_str()),
        ("X-SOURCE", "CATALOG_MANAGER_REQUEST"),
        ("X-INTERNAL-API-CLIENT", "true"),
        ("X-Forwarded-User", "root"),
    ];
    // A plain user stays a plain user.
    let (st, v) = call(&c, Method::GET, &s.api("/auth/users"), &Auth::Bearer(user.clone()), None, &spoof).await;
    assert_eq!(st, 403, "{v}");
    let (st, v) = call(&c, Method::GET, &s.api("/audit"), &Auth::Bearer(user.clone()), None, &spoof).await;
    assert_eq!(st, 403, "{v}");
    let (st, v) = call(
        &c,
        Method::POST,
        &s.api("/auth/users"),
        &Auth::Bearer(user.clone()),
        Some(json!({"username": "evil", "email": "evil@x.test", "password": USER_PASSWORD, "is_super_user": true})),
        &spoof,
    )
    .await;
    assert_eq!(st, 403, "{v}");
    // Nobody at all stays nobody.
    let (st, v) = call(&c, Method::GET, &s.api("/auth/users"), &Auth::None, None, &spoof).await;
    assert_eq!(st, 401, "{v}");
    // A USER cannot give itself roles or claims either.
    let (st, v) = call(&c, Method::GET, &s.api("/auth/me"), &Auth::Bearer(user.clone()), None, &spoof).await;
    assert_eq!(st, 200);
    assert_eq!(v["roles"], json!(["USER"]));
    assert_eq!(v["isSuperUser"], json!(false));
    // A client-chosen request id does not reach the audit log.
    let (st, _) =
        call(&c, Method::GET, &s.api("/auth/me"), &Auth::Bearer(user.clone()), None, &[("x-request-id", "forged")])
            .await;
    assert_eq!(st, 200);
}

#[tokio::test]
async fn served_openapi_matches_the_committed_file() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[]);
    let c = client();
    let (st, served) = call(&c, Method::GET, &s.api("/openapi.json"), &Auth::None, None, &[]).await;
    assert_eq!(st, 200);
    assert_eq!(served["openapi"].as_str().map(|v| v.starts_with("3.1")), Some(true), "OpenAPI 3.1");
    let committed_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
    let committed: Value =
        serde_json::from_str(&std::fs::read_to_string(committed_path).unwrap_or_default()).unwrap_or(Value::Null);
    assert!(
        committed == served,
        "docs/openapi.json differs from the served document; regenerate it with `cargo run -p hangar -- openapi > docs/openapi.json` and review the change"
    );
    // Swagger UI is served from the binary.
    let r = c.get(format!("{}/swagger/", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("swagger"), "Swagger UI page");
}

#[tokio::test]
async fn bad_inputs_get_a_4xx_with_the_error_body() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[("API_BODY_LIMIT", "65536")]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let huge = "x".repeat(50_000);
    let over = "y".repeat(70_000);
    struct Case {
        name: &'static str,
        method: Method,
        path: String,
        body: Option<Vec<u8>>,
        content_type: &'static str,
        expect: u16,
    }
    let j = |v: Value| Some(serde_json::to_vec(&v).unwrap());
    let cases = vec![
        Case {
            name: "malformed JSON",
            method: Method::POST,
            path: "/auth/users".into(),
            body: Some(b"{\"username\": ".to_vec()),
            content_type: "application/json",
            expect: 400,
        },
        Case {
            name: "not JSON at all",
            method: Method::POST,
            path: "/auth/roles".into(),
            body: Some(b"\x00\xff\xfe".to_vec()),
            content_type: "application/json",
            expect: 400,
        },
        Case {
            name: "wrong type",
            method: Method::POST,
            path: "/auth/users".into(),
            body: j(json!({"username": 5, "email": [], "password": true})),
            content_type: "application/json",
            expect: 422,
        },
        Case {
            name: "missing field",
            method: Method::POST,
            path: "/auth/roles".into(),
            body: j(json!({})),
            content_type: "application/json",
            expect: 422,
        },
        Case {
            name: "unknown field",
            method: Method::POST,
            path: "/auth/users".into(),
            body: j(json!({"username": "a", "email": "a@b.c", "password": "x", "admin": true})),
            content_type: "application/json",
            expect: 422,
        },
        Case {
            name: "wrong content type",
            method: Method::POST,
            path: "/auth/roles".into(),
            body: Some(b"name=x".to_vec()),
            content_type: "text/plain",
            expect: 415,
        },
        Case {
            name: "oversized body",
            method: Method::POST,
            path: "/auth/claims".into(),
            body: j(json!({"name": over})),
            content_type: "application/json",
            expect: 413,
        },
        Case {
            name: "empty name",
            method: Method::POST,
            path: "/auth/roles".into(),
            body: j(json!({"name": ""})),
            content_type: "application/json",
            expect: 400,
        },
        Case {
            name: "huge name",
            method: Method::POST,
            path: "/auth/claims".into(),
            body: j(json!({"name": huge})),
            content_type: "application/json",
            expect: 400,
        },
        Case {
            name: "bad characters in a name",
            method: Method::POST,
            path: "/auth/roles".into(),
            body: j(json!({"name": "a/b;DROP"})),
            content_type: "application/json",
            expect: 400,
        },
        Case {
            name: "bad email",
            method: Method::POST,
            path: "/auth/users".into(),
            body: j(json!({"username": "ok", "email": "not-an-email", "password": USER_PASSWORD})),
            content_type: "application/json",
            expect: 400,
        },
        Case {
            name: "weak password",
            method: Method::POST,
            path: "/auth/users".into(),
            body: j(json!({"username": "ok2", "email": "ok2@x.test", "password": "short"})),
            content_type: "application/json",
            expect: 422,
        },
        Case {
            name: "unknown role on create",
            method: Method::POST,
            path: "/auth/users".into(),
            body: j(json!({"username": "ok3", "email": "ok3@x.test", "password": USER_PASSWORD, "roles": ["NOPE"]})),
            content_type: "application/json",
            expect: 400,
        },
        Case {
            name: "bad id",
            method: Method::GET,
            path: "/auth/users/%00%01".into(),
            body: None,
            content_type: "",
            expect: 404,
        },
        Case {
            name: "long id",
            method: Method::GET,
            path: format!("/auth/roles/{}", "r".repeat(5000)),
            body: None,
            content_type: "",
            expect: 404,
        },
        Case {
            name: "unknown event type",
            method: Method::GET,
            path: "/ws/subscribe?event_types=bogus".into(),
            body: None,
            content_type: "",
            expect: 400,
        },
        Case {
            name: "bad query value",
            method: Method::GET,
            path: "/audit?limit=many".into(),
            body: None,
            content_type: "",
            expect: 400,
        },
        Case {
            name: "unknown query key",
            method: Method::GET,
            path: "/audit?sneaky=1".into(),
            body: None,
            content_type: "",
            expect: 400,
        },
        Case {
            name: "expiry in the past",
            method: Method::POST,
            path: "/auth/api_keys".into(),
            body: j(json!({"name": "k", "expires_at": "2001-01-01T00:00:00Z"})),
            content_type: "application/json",
            expect: 400,
        },
        Case {
            name: "bad timestamp",
            method: Method::POST,
            path: "/auth/api_keys".into(),
            body: j(json!({"name": "k", "expires_at": "yesterday"})),
            content_type: "application/json",
            expect: 422,
        },
        Case {
            name: "short secret",
            method: Method::POST,
            path: "/auth/api_keys".into(),
            body: j(json!({"name": "k", "secret": "abc"})),
            content_type: "application/json",
            expect: 422,
        },
        Case {
            name: "unknown route",
            method: Method::GET,
            path: "/no/such/route".into(),
            body: None,
            content_type: "",
            expect: 404,
        },
        Case {
            name: "wrong method",
            method: Method::PATCH,
            path: "/auth/users".into(),
            body: None,
            content_type: "",
            expect: 405,
        },
        Case {
            name: "duplicate role",
            method: Method::POST,
            path: "/auth/roles".into(),
            body: j(json!({"name": "USER"})),
            content_type: "application/json",
            expect: 409,
        },
        Case {
            name: "delete built-in role",
            method: Method::DELETE,
            path: "/auth/roles/ADMIN".into(),
            body: None,
            content_type: "",
            expect: 409,
        },
    ];
    for case in cases {
        let mut r = c.request(case.method.clone(), s.api(&case.path)).bearer_auth(&root);
        if let Some(b) = case.body {
            r = r.header("content-type", case.content_type).body(b);
        }
        let resp = r.send().await.unwrap();
        let st = resp.status().as_u16();
        let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        assert_eq!(st, case.expect, "{}: got {st} {v}", case.name);
        assert!(ct.starts_with("application/json"), "{}: content type {ct}", case.name);
        assert_eq!(v["code"].as_u64(), Some(st as u64), "{}: {v}", case.name);
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{}: {v}", case.name);
        assert!(v["request_id"].as_str().is_some(), "{}: {v}", case.name);
    }
    // The server is still healthy after all that.
    let (st, _) = call(&c, Method::GET, &s.api("/health/probe"), &Auth::None, None, &[]).await;
    assert_eq!(st, 200);
    assert!(!s.log().contains("panicked"), "the server panicked: {}", s.log());
}
