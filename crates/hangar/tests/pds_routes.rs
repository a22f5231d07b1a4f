//! The README's table of every reference route says, for each, whether Hangar serves it or
//! left it out on purpose. This checks the table against the routes Hangar documents in
//! `docs/openapi.json` (which `api_access.rs` checks against the code): a route marked
//! served exists with that method, a route left out does not, and nothing is unsaid.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;

/// `/a/{x}/b/` → `/a/{}/b`: parameter names differ between the two servers.
fn shape(path: &str) -> String {
    let mut out = String::new();
    let mut in_param = false;
    for c in path.trim_end_matches('/').chars() {
        match c {
            '{' => {
                in_param = true;
                out.push_str("{}");
            }
            '}' => in_param = false,
            _ if in_param => {}
            _ => out.push(c),
        }
    }
    out
}

#[test]
fn the_readme_route_table_matches_the_routes_served() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{root}/docs/openapi.json")).unwrap()).unwrap();
    let mut served = HashSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            served.insert((method.to_uppercase(), shape(path)));
        }
    }

    let section = readme.split("#### Every reference route").nth(1).expect("the README has the route table");
    let section = section.split("</details>").next().unwrap();
    let mut rows = 0;
    let mut wrong = Vec::new();
    for line in section.lines().filter(|l| l.starts_with("| ") && l.contains("| `/")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (method, path, status) = (cells[1], cells[2].trim_matches('`'), cells[3]);
        rows += 1;
        let there = served.contains(&(method.to_string(), shape(path)));
        match status {
            "served" if !there => wrong.push(format!("{method} {path} is marked served but is not")),
            "left out" if there => wrong.push(format!("{method} {path} is marked left out but is served")),
            "left out" if cells[4].is_empty() => wrong.push(format!("{method} {path} is left out without a reason")),
            "served" | "left out" => {}
            other => wrong.push(format!("{method} {path}: status {other:?}")),
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(rows, 240, "every reference route has a row (241 registrations, one of them twice)");
}
