//! Kill -9 crash test: a child process commits concurrently and prints every acknowledged
//! commit; we SIGKILL it at random moments and check that every acknowledged commit survived
//! and that the store's invariants hold.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hangar_store::{JsonStore, JsonStoreOptions, Store};

const RUNS: usize = 24;
const WRITERS: &str = "4";

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn spawn_writer(dir: &std::path::Path, run: usize) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_store-crash-writer"))
        .arg("write")
        .arg(dir)
        .arg(format!("run{run}"))
        .arg(WRITERS)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Records an output line; returns true for an ack.
fn take_line(line: &str, acks: &mut BTreeMap<String, u64>, max_counter: &mut u64) -> bool {
    if let Some(rest) = line.strip_prefix("ack ") {
        let (id, counter) = rest.split_once(' ').unwrap();
        let counter: u64 = counter.parse().unwrap();
        acks.insert(id.to_string(), counter);
        *max_counter = (*max_counter).max(counter);
        true
    } else if line.starts_with("error") {
        panic!("the writer child failed: {line}");
    } else {
        false
    }
}

async fn verify(dir: &std::path::Path, acks: &BTreeMap<String, u64>, max_counter: u64, run: usize) {
    let store = match JsonStore::open(dir, JsonStoreOptions::default()).await {
        Ok(store) => store,
        Err(e) => panic!("run {run}: the store does not load after kill -9: {e}"),
    };
    let records = store.list("records").await.unwrap();
    let present: std::collections::BTreeSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
    let missing: Vec<&String> = acks.keys().filter(|id| !present.contains(id.as_str())).collect();
    assert!(missing.is_empty(), "run {run}: acknowledged commits lost after kill -9: {missing:?}");
    let counter = store.get("counters", "total").await.unwrap().map(|r| r.value.as_u64().unwrap()).unwrap_or(0);
    assert!(counter >= max_counter, "run {run}: counter {counter} below the acknowledged {max_counter}");
    // Each batch adds one record and bumps the counter: a torn batch would break this.
    assert_eq!(counter as usize, records.len(), "run {run}: counter and record count disagree");
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_commits_survive_kill_9() {
    let seed = std::env::var("HANGAR_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64 | 1);
    println!("crash test seed {seed} (set HANGAR_CRASH_SEED to replay)");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut acks = BTreeMap::new();
    let mut max_counter = 0;
    let mut kills_after_acks = 0;
    for run in 0..RUNS {
        let (mut child, lines) = spawn_writer(dir.path(), run);
        // One run in five is killed as soon as it starts (possibly during recovery); the
        // others after a random number of acknowledged commits.
        let target = if rng.next().is_multiple_of(5) { 0 } else { 1 + rng.next() % 120 } as usize;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = 0usize;
        while seen < target {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if take_line(&line, &mut acks, &mut max_counter) {
                        seen += 1;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("run {run}: only {seen} of {target} acks within 60 s")
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("run {run}: the writer exited by itself: {:?}", child.wait())
                }
            }
        }
        if target > 0 {
            kills_after_acks += 1;
        }
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert!(!status.success(), "run {run}: the writer was not killed: {status:?}");
        // Acks printed before the kill count too: they were acknowledged.
        for line in lines.iter() {
            take_line(&line, &mut acks, &mut max_counter);
        }
        // Most runs are checked here; the others leave the crashed folder to the next
        // child's recovery.
        if run % 3 != 2 || run == RUNS - 1 {
            verify(dir.path(), &acks, max_counter, run).await;
        }
    }
    println!("{RUNS} kills ({kills_after_acks} mid-write), {} acknowledged commits checked", acks.len());
    assert!(kills_after_acks >= 10, "too few kills happened mid-write");
    assert!(acks.len() >= 100, "too few acknowledged commits to mean anything: {}", acks.len());
}
