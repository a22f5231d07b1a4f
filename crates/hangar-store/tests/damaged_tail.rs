//! Issue 12, row 18: a flipped byte in the journal's last frame made recovery drop an
//! acknowledged commit and its bytes. The dropped tail is now kept aside next to the
//! journal (`journal.damaged-<time>`, named in the log) before the journal is cut.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use hangar_store::json::{DAMAGED_TAIL_PREFIX, JOURNAL_FILE, LOCK_FILE};
use hangar_store::{Batch, JsonStore, JsonStoreOptions, Store};
use serde_json::json;

const HEADER_LEN: usize = 92;
const FRAME_HEADER_LEN: usize = 32;

fn damaged_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(DAMAGED_TAIL_PREFIX))
        .collect();
    out.sort();
    out
}

/// Wait (with a deadline) until a dropped store's writer has released the folder lock.
fn wait_unlocked(dir: &Path) {
    let lock_free = || {
        let f = std::fs::OpenOptions::new().write(true).open(dir.join(LOCK_FILE)).unwrap();
        f.try_lock().is_ok()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lock_free() {
        assert!(Instant::now() < deadline, "the dropped store never released its lock");
        std::thread::yield_now();
    }
}

#[tokio::test]
async fn a_damaged_last_frame_is_kept_aside_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    let store = JsonStore::open(dir.path(), JsonStoreOptions::default()).await.unwrap();
    for rev in 1..=3u64 {
        let batch = Batch::new().put("c", &format!("k{rev}"), json!({"secret_of": format!("commit-{rev}")}));
        assert_eq!(store.commit(batch).await.unwrap().revision, rev, "commit {rev} acknowledged");
    }
    // Drop without close (close would compact the journal into data.json).
    drop(store);
    wait_unlocked(dir.path());

    // Flip one byte in the payload of the last frame (revision 3, acknowledged).
    let journal_path = dir.path().join(JOURNAL_FILE);
    let original = std::fs::read(&journal_path).unwrap();
    let mut starts = Vec::new();
    let mut at = HEADER_LEN;
    while at + FRAME_HEADER_LEN <= original.len() {
        starts.push(at);
        at += FRAME_HEADER_LEN + u32::from_le_bytes(original[at + 4..at + 8].try_into().unwrap()) as usize;
    }
    assert_eq!((starts.len(), at), (3, original.len()), "three frames, nothing else");
    let last = starts[2];
    let flip = last + FRAME_HEADER_LEN + 2;
    let mut damaged = original.clone();
    damaged[flip] ^= 0x01;
    std::fs::write(&journal_path, &damaged).unwrap();
    assert!(damaged_files(dir.path()).is_empty());

    // Recovery comes back at revision 2 and keeps the damaged frame's bytes aside.
    let store = JsonStore::open(dir.path(), JsonStoreOptions::default()).await.unwrap();
    assert!(store.get("c", "k2").await.unwrap().is_some());
    assert!(store.get("c", "k3").await.unwrap().is_none(), "the damaged commit is not applied");
    assert_eq!(std::fs::read(&journal_path).unwrap().len(), last, "the journal is cut at the damaged frame");
    let kept = damaged_files(dir.path());
    assert_eq!(kept.len(), 1, "one file holds the dropped tail: {kept:?}");
    let bytes = std::fs::read(&kept[0]).unwrap();
    assert_eq!(bytes, damaged[last..], "the kept file holds exactly the dropped bytes");
    assert!(String::from_utf8_lossy(&bytes).contains("commit-3"), "the acknowledged commit's data survives");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&kept[0]).unwrap().permissions().mode() & 0o777, 0o600);

    // The store works on, and a clean reopen keeps nothing more aside.
    assert_eq!(store.commit(Batch::new().put("c", "k4", json!({}))).await.unwrap().revision, 3);
    drop(store);
    wait_unlocked(dir.path());
    let store = JsonStore::open(dir.path(), JsonStoreOptions::default()).await.unwrap();
    assert!(store.get("c", "k4").await.unwrap().is_some());
    assert_eq!(damaged_files(dir.path()).len(), 1);
    store.close().await.unwrap();
}
