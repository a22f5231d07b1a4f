//! A host's catalog image cache (`/catalog/cache`, alias `/cache`): the list answer and the
//! calls the orchestrator forwards to a host (`/orchestrator/hosts/{id}/cache...`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use hangar_core::path_segment as seg;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::calls::HttpCall;

/// An image in a host's cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CachedImage {
    pub id: String,
    pub catalog_id: String,
    pub version: String,
    pub architecture: String,
    pub image_hash: String,
    pub path: String,
    pub size: u64,
    pub cached_at: DateTime<Utc>,
    pub last_used_at: DateTime<Utc>,
    pub used_count: u64,
}

/// The images in a host's cache and their total size in bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CatalogCacheList {
    pub total_size: u64,
    pub manifests: Vec<CachedImage>,
}

/// One cache operation, as a host's API takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheCall {
    List,
    /// Everything, one catalog id (every version), or one version.
    Delete {
        catalog_id: Option<String>,
        version: Option<String>,
    },
}

impl CacheCall {
    /// The request on the host's own `/catalog/cache` routes.
    pub fn request(&self) -> HttpCall {
        let timeout = Duration::from_secs(120);
        match self {
            CacheCall::List => HttpCall { method: "GET", path: "/catalog/cache".into(), body: None, timeout },
            CacheCall::Delete { catalog_id, version } => {
                let mut path = "/catalog/cache".to_string();
                if let Some(id) = catalog_id {
                    path = format!("{path}/{}", seg(id));
                    if let Some(v) = version {
                        path = format!("{path}/{}", seg(v));
                    }
                }
                HttpCall { method: "DELETE", path, body: None, timeout }
            }
        }
    }

    /// The audit name of the call.
    pub fn action(&self) -> &'static str {
        match self {
            CacheCall::List => "cache.list",
            CacheCall::Delete { .. } => "cache.delete",
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cache_calls_name_the_host_routes() {
        let d = |c: Option<&str>, v: Option<&str>| {
            CacheCall::Delete { catalog_id: c.map(Into::into), version: v.map(Into::into) }.request().path
        };
        assert_eq!(CacheCall::List.request().method, "GET");
        assert_eq!(d(None, None), "/catalog/cache");
        assert_eq!(d(Some("ubuntu"), None), "/catalog/cache/ubuntu");
        assert_eq!(d(Some("a b"), Some("v/1")), format!("/catalog/cache/{}/{}", seg("a b"), seg("v/1")));
    }
}
