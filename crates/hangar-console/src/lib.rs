//! Hangar's web console, as files embedded at build time.
//!
//! `build.rs` embeds `console/dist` (made by `scripts/build-console.sh`, `npm ci && npm run
//! build`) when it exists; without it every page is [`NOT_BUILT_PAGE`], which says how to
//! build the console, and the Rust build needs no npm. This crate knows no HTTP framework:
//! [`get`] maps a path below `/console/` to an [`Asset`] (body, content type, cache policy),
//! and [`SECURITY_HEADERS`] are the headers every console answer carries; `hangar-api`
//! mounts it.
//!
//! The assets hold no data (the console reads everything through the API with the caller's
//! session), so they are public.

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded.rs"));
}

/// Whether the console's files were embedded in this build.
pub const BUILT: bool = embedded::BUILT;

/// The page served for every console route when the console was not built.
pub const NOT_BUILT_PAGE: &str = include_str!("not_built.html");

/// Cache policy of files whose name carries their content hash (Vite's `assets/`).
pub const CACHE_IMMUTABLE: &str = "public, max-age=31536000, immutable";
/// Cache policy of everything else (the index, the not-built page): revalidate each time.
pub const CACHE_REVALIDATE: &str = "no-cache";

/// Headers on every console answer: a strict Content-Security-Policy (only this origin; no
/// inline script or style, no framing), no framing, no type sniffing, no referrer leaks.
pub const SECURITY_HEADERS: &[(&str, &str)] = &[
    (
        "content-security-policy",
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
         font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cross-origin-opener-policy", "same-origin"),
];

/// One file to answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asset {
    pub body: &'static [u8],
    pub content_type: &'static str,
    pub cache_control: &'static str,
}

/// Content type by file extension (what Vite emits).
pub fn content_type(path: &str) -> &'static str {
    let ext = path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "webp" => "image/webp",
        "woff2" => "font/woff2",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

fn file(path: &str) -> Option<&'static [u8]> {
    embedded::FILES.iter().find(|(p, _)| *p == path).map(|(_, b)| *b)
}

fn index() -> Asset {
    let body = if BUILT { file("index.html").unwrap_or(NOT_BUILT_PAGE.as_bytes()) } else { NOT_BUILT_PAGE.as_bytes() };
    Asset { body, content_type: "text/html; charset=utf-8", cache_control: CACHE_REVALIDATE }
}

/// The answer for `path`, relative to the console's root (`""`, `"fleet"`, `"assets/x.js"`).
///
/// A file of the build answers itself (hashed `assets/` immutable, the rest revalidated); any
/// other path without a file extension is a route of the single-page app and answers the
/// index; a missing file (`assets/...`, or a name with an extension) is `None` (404).
pub fn get(path: &str) -> Option<Asset> {
    let path = path.trim_start_matches('/');
    if path.is_empty() || path == "index.html" {
        return Some(index());
    }
    if path.split('/').any(|seg| seg == ".." || seg == ".") {
        return None;
    }
    if let Some(body) = file(path) {
        let cache_control = if path.starts_with("assets/") { CACHE_IMMUTABLE } else { CACHE_REVALIDATE };
        return Some(Asset { body, content_type: content_type(path), cache_control });
    }
    let last = path.rsplit('/').next().unwrap_or(path);
    if path.starts_with("assets/") || last.contains('.') {
        return None;
    }
    Some(index())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_answer_the_index_and_missing_files_nothing() {
        for p in ["", "/", "fleet", "vms/abc", "index.html"] {
            let a = get(p).expect(p);
            assert_eq!(a.content_type, "text/html; charset=utf-8");
            assert_eq!(a.cache_control, CACHE_REVALIDATE);
        }
        assert_eq!(get("assets/nope-1234.js"), None);
        assert_eq!(get("favicon-nope.png"), None);
        assert_eq!(get("../Cargo.toml"), None);
        if !BUILT {
            assert!(std::str::from_utf8(get("fleet").unwrap().body).unwrap().contains("scripts/build-console.sh"));
        }
    }

    #[test]
    fn embedded_files_have_types_and_hashed_assets_are_immutable() {
        for (p, body) in embedded::FILES {
            let a = get(p).expect(p);
            assert_eq!(a.body, *body, "{p}");
            if p.starts_with("assets/") {
                assert_eq!(a.cache_control, CACHE_IMMUTABLE, "{p}");
                assert_ne!(a.content_type, "application/octet-stream", "{p}");
            }
        }
        assert_eq!(content_type("a/b.JS"), "text/javascript; charset=utf-8");
        assert_eq!(content_type("x.css"), "text/css; charset=utf-8");
    }
}
