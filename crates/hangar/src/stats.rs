//! `stats` events: every [`INTERVAL`], while a stream wants them, one
//! `System Stats` event with the server process's own figures in the reference's keys
//! (`memory_bytes`, `cpu_percent`, ...; read from `/proc` where there is one) and, when the
//! host module runs, the host's hardware use (`hardware`). The orchestrator republishes a
//! host's as `HOST_STATS_UPDATE {host_id, stats}`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hangar_core::{Event, EventBus, EventType};
use serde_json::{Value, json};

pub const INTERVAL: Duration = Duration::from_secs(5);

/// User and system CPU seconds, resident bytes and threads of this process (Linux).
fn process() -> Option<(f64, f64, u64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = 100.0; // USER_HZ
    let utime = f.get(11)?.parse::<f64>().ok()? / ticks;
    let stime = f.get(12)?.parse::<f64>().ok()? / ticks;
    let threads = f.get(17)?.parse::<u64>().ok()?;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some((utime, stime, pages * 4096, threads))
}

async fn hardware(host: &hangar_host::Host) -> Option<Value> {
    let h = host.hardware().await.ok()?;
    Some(json!({
        "total_cpu": h.total_cpu, "in_use_cpu": h.in_use_cpu, "available_cpu": h.available_cpu,
        "total_memory_mb": h.total_memory_mb, "in_use_memory_mb": h.in_use_memory_mb,
        "available_memory_mb": h.available_memory_mb, "total_disk_mb": h.total_disk_mb,
        "in_use_disk_mb": h.in_use_disk_mb, "available_disk_mb": h.available_disk_mb,
        "running_vms": h.running_vms, "mac_vms_running": h.mac_vms_running,
    }))
}

/// Start publishing `System Stats` events on `bus`.
pub fn publish(bus: EventBus, host: Option<Arc<hangar_host::Host>>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Option<(Instant, f64)> = None;
        loop {
            tick.tick().await;
            if !bus.wanted(EventType::Stats) {
                last = None;
                continue;
            }
            let mut body = serde_json::Map::new();
            if let Some((user, system, rss, threads)) = process() {
                let now = Instant::now();
                let cpu_percent = match last {
                    Some((at, before)) => {
                        let wall = now.duration_since(at).as_secs_f64();
                        if wall > 0.0 { ((user + system - before) / wall * 100.0).max(0.0) } else { 0.0 }
                    }
                    None => 0.0,
                };
                last = Some((now, user + system));
                body.insert("memory_bytes".into(), json!(rss));
                body.insert("memory_alloc_bytes".into(), json!(rss));
                body.insert("cpu_user_seconds".into(), json!(user));
                body.insert("cpu_system_seconds".into(), json!(system));
                body.insert("cpu_percent".into(), json!(cpu_percent));
                // The reference counts goroutines; the nearest here is the process's threads.
                body.insert("goroutines".into(), json!(threads));
                body.insert("goroutines_smoothed".into(), json!(threads));
            }
            if let Some(h) = &host
                && let Some(hw) = hardware(h).await
            {
                body.insert("hardware".into(), hw);
            }
            bus.publish(Event::new(EventType::Stats, "System Stats", Value::Object(body)));
        }
    });
}
