//! A standalone Hangar proxy for benchmarks (see `bench/proxy.sh`).
//!
//! `proxy_bench http LISTEN TARGET` forwards HTTP from LISTEN to TARGET (both `ip:port`);
//! `proxy_bench tcp LISTEN TARGET` forwards raw TCP; `proxy_bench http-hyper LISTEN TARGET`
//! forwards HTTP with the HTTP/1.1 fast lane off, so hyper serves every request (to measure
//! the general path: HTTP/2, upgrades and the other cases the fast lane hands over);
//! `proxy_bench https LISTEN TARGET CERT KEY` forwards HTTP from a TLS listener (HTTP/2 or
//! HTTP/1.1 by ALPN) with the certificate and key PEM files given. Runs until SIGINT or SIGTERM.

use std::error::Error;
use std::net::SocketAddr;

use hangar_proxy::{ProxyManager, ReverseProxyConfig};
use serde_json::json;

fn main() -> Result<(), Box<dyn Error>> {
    // PROXY_BENCH_RT=current: a single-threaded runtime (for profiling, e.g. under callgrind);
    // otherwise PROXY_BENCH_WORKERS: tokio worker threads (default: one per core).
    if std::env::var("PROXY_BENCH_RT").as_deref() == Ok("current") {
        return tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(run());
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = std::env::var("PROXY_BENCH_WORKERS").ok().and_then(|v| v.parse().ok()) {
        rt.worker_threads(n);
    }
    rt.enable_all().build()?.block_on(run())
}

async fn run() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, listen, target, tls) = match args.as_slice() {
        [mode, listen, target] => (mode, listen, target, None),
        [mode, listen, target, cert, key] if mode == "https" => (mode, listen, target, Some((cert, key))),
        _ => {
            return Err(
                "usage: proxy_bench http|http-hyper|tcp LISTEN_IP:PORT TARGET_IP:PORT | https LISTEN TARGET CERT KEY"
                    .into(),
            );
        }
    };
    let listen: SocketAddr = listen.parse()?;
    let target: SocketAddr = target.parse()?;
    let mut host = json!({"id": "bench", "host": listen.ip().to_string(), "port": listen.port()});
    let route = json!({"id": "r", "target_host": target.ip().to_string(), "target_port": target.port()});
    match mode.as_str() {
        "http" | "http-hyper" | "https" => host["http_routes"] = json!([route]),
        "tcp" => host["tcp_route"] = route,
        other => return Err(format!("unknown mode {other:?}").into()),
    }
    if let Some((cert, key)) = tls {
        host["tls"] = json!({"enabled": true, "cert": cert, "key": key});
    }
    let cfg: ReverseProxyConfig = serde_json::from_value(json!({"hosts": [host]}))?;
    // PROXY_BENCH_IO_THREADS: the manager's dedicated I/O threads (default 0: this runtime).
    let io_threads = std::env::var("PROXY_BENCH_IO_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let m = ProxyManager::builder().io_threads(io_threads).http1_fast_lane(mode != "http-hyper").build()?;
    let report = m.apply(&cfg).await?;
    if let Some((_, e)) = report.failed.first() {
        return Err(e.clone().into());
    }
    println!("proxy_bench {mode} listening on {listen} -> {target}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    m.shutdown().await;
    Ok(())
}
