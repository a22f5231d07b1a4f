//! The server's side of metrics: the store wrapper that times every commit, and the
//! optional unauthenticated `/metrics` listener (`METRICS_PORT`). The series themselves are
//! declared in `hangar_metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use async_trait::async_trait;
use hangar_store::{Batch, Committed, Dump, Record, Store};

/// A store that times each commit (`hangar_store_commit_duration_seconds`) and counts the
/// failed ones; everything else passes through. Wraps the store once, where `serve` opens it.
pub struct TimedStore {
    inner: Arc<dyn Store>,
}

/// Wrap `inner` so its commits are measured.
pub fn timed(inner: Arc<dyn Store>) -> Arc<dyn Store> {
    Arc::new(TimedStore { inner })
}

#[async_trait]
impl Store for TimedStore {
    fn engine(&self) -> &'static str {
        self.inner.engine()
    }
    fn shared(&self) -> bool {
        self.inner.shared()
    }
    async fn get(&self, collection: &str, id: &str) -> hangar_store::Result<Option<Record>> {
        self.inner.get(collection, id).await
    }
    async fn list(&self, collection: &str) -> hangar_store::Result<Vec<Record>> {
        self.inner.list(collection).await
    }
    async fn list_page(
        &self,
        collection: &str,
        after: Option<&str>,
        limit: usize,
    ) -> hangar_store::Result<Vec<Record>> {
        self.inner.list_page(collection, after, limit).await
    }
    async fn commit(&self, batch: Batch) -> hangar_store::Result<Committed> {
        let started = Instant::now();
        let r = self.inner.commit(batch).await;
        hangar_metrics::metrics().store_commit(r.is_ok(), started.elapsed());
        r
    }
    async fn export(&self) -> hangar_store::Result<Dump> {
        self.inner.export().await
    }
    async fn import(&self, dump: Dump) -> hangar_store::Result<()> {
        self.inner.import(dump).await
    }
    async fn close(&self) -> hangar_store::Result<()> {
        self.inner.close().await
    }
}

/// Bind the `METRICS_PORT` listener (GET /metrics only, no authentication) and serve it
/// until `handle` shuts down. Returns the bound address.
pub fn spawn_listener(
    addr: SocketAddr,
    handle: axum_server::Handle<SocketAddr>,
    servers: &mut tokio::task::JoinSet<std::io::Result<()>>,
) -> Result<SocketAddr> {
    let listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr} (METRICS_PORT)"))?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let svc = hangar_api::routes::metrics::listener_app().into_make_service();
    let server = axum_server::from_tcp(listener)?;
    servers.spawn(async move { server.handle(handle).serve(svc).await });
    Ok(bound)
}
