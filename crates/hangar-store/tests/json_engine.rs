//! Behaviour specific to the JSON engine: durability across reopen, recovery of damaged
//! journals, encryption, the folder lock (in-process and across processes) and backups.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hangar_store::json::{BACKUP_DIR, JOURNAL_FILE, LOCK_FILE, SNAPSHOT_FILE, backup_files};
use hangar_store::{Batch, EncryptionKey, JsonStore, JsonStoreOptions, Store, StoreError};
use serde_json::json;

const HEADER_LEN: usize = 92;
const FRAME_HEADER_LEN: usize = 32;

fn plain() -> JsonStoreOptions {
    JsonStoreOptions::default()
}

fn with_key(key: &EncryptionKey) -> JsonStoreOptions {
    JsonStoreOptions { encryption_key: Some(key.clone()), ..JsonStoreOptions::default() }
}

/// Opens, retrying while a dropped store's writer thread still holds the lock.
async fn open_when_free(dir: &Path, options: JsonStoreOptions) -> JsonStore {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match JsonStore::open(dir, options.clone()).await {
            Ok(store) => return store,
            Err(StoreError::Locked { .. }) if Instant::now() < deadline => tokio::task::yield_now().await,
            Err(e) => panic!("open failed: {e}"),
        }
    }
}

/// Start offsets of every frame in a journal, parsed independently of the engine.
fn frame_starts(journal: &[u8]) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut at = HEADER_LEN;
    while at + FRAME_HEADER_LEN <= journal.len() {
        let len = u32::from_le_bytes(journal[at + 4..at + 8].try_into().unwrap()) as usize;
        starts.push(at);
        at += FRAME_HEADER_LEN + len;
    }
    assert_eq!(at, journal.len(), "test parser out of step with the journal");
    starts
}

/// A folder holding five commits in the journal (never compacted): revisions 1..=5 put
/// `c/k{rev}`, and revision 3 also deletes `c/k1`.
async fn five_commits(options: JsonStoreOptions) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let store = JsonStore::open(dir.path(), options).await.unwrap();
    for rev in 1..=5u64 {
        let mut batch = Batch::new().put("c", &format!("k{rev}"), json!({"rev": rev}));
        if rev == 3 {
            batch = batch.delete("c", "k1");
        }
        assert_eq!(store.commit(batch).await.unwrap().revision, rev);
    }
    // Drop without close: close would compact the journal away.
    drop(store);
    // Wait for the writer to let go, without touching the files.
    let lock_free = || {
        let f = std::fs::OpenOptions::new().write(true).open(dir.path().join(LOCK_FILE)).unwrap();
        f.try_lock().is_ok()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lock_free() {
        assert!(Instant::now() < deadline, "the dropped store never released its lock");
        std::thread::yield_now();
    }
    dir
}

fn copy_store(from: &Path, journal: &[u8]) -> tempfile::TempDir {
    let to = tempfile::tempdir().unwrap();
    std::fs::copy(from.join(SNAPSHOT_FILE), to.path().join(SNAPSHOT_FILE)).unwrap();
    std::fs::write(to.path().join(JOURNAL_FILE), journal).unwrap();
    to
}

async fn ids(store: &JsonStore) -> Vec<String> {
    store.list("c").await.unwrap().into_iter().map(|r| r.id).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn reopen_keeps_data_with_and_without_close() {
    let dir = tempfile::tempdir().unwrap();
    let store = JsonStore::open(dir.path(), plain()).await.unwrap();
    store.commit(Batch::new().put("users", "alice", json!({"n": 1})).put("users", "bob", json!(2))).await.unwrap();
    store.commit(Batch::new().delete("users", "bob").put("hosts", "h1", json!([1]))).await.unwrap();
    let rev = store.revision().unwrap();
    drop(store); // journal replay path
    let store = open_when_free(dir.path(), plain()).await;
    assert_eq!(store.revision().unwrap(), rev);
    assert_eq!(store.get("users", "alice").await.unwrap().unwrap().value, json!({"n": 1}));
    assert!(store.get("users", "bob").await.unwrap().is_none());
    store.commit(Batch::new().put("users", "carol", json!(3))).await.unwrap();
    store.close().await.unwrap(); // compaction path
    let snapshot = std::fs::read_to_string(dir.path().join(SNAPSHOT_FILE)).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&snapshot).unwrap();
    assert_eq!(doc["collections"]["users"]["carol"]["value"], json!(3), "data.json must be readable JSON");
    assert_eq!(std::fs::metadata(dir.path().join(JOURNAL_FILE)).unwrap().len() as usize, HEADER_LEN);
    let store = JsonStore::open(dir.path(), plain()).await.unwrap();
    assert_eq!(store.revision().unwrap(), rev + 1);
    let users: Vec<String> = store.list("users").await.unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(users, ["alice", "carol"]);
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn torn_tail_at_every_offset_recovers_the_last_good_commit() {
    let source = five_commits(plain()).await;
    let journal = std::fs::read(source.path().join(JOURNAL_FILE)).unwrap();
    let starts = frame_starts(&journal);
    assert_eq!(starts.len(), 5);
    let last = starts[4];
    for cut in last..journal.len() {
        let dir = copy_store(source.path(), &journal[..cut]);
        let store = JsonStore::open(dir.path(), plain()).await.unwrap();
        assert_eq!(store.revision().unwrap(), 4, "cut at {cut}");
        assert_eq!(ids(&store).await, ["k2", "k3", "k4"], "cut at {cut}");
        drop(store);
        let len = std::fs::metadata(dir.path().join(JOURNAL_FILE)).unwrap().len() as usize;
        assert_eq!(len, last, "cut at {cut}: the torn tail must be truncated away");
    }
    // After recovery the store keeps working and the new commit lands after the cut.
    let dir = copy_store(source.path(), &journal[..last + 9]);
    let store = JsonStore::open(dir.path(), plain()).await.unwrap();
    assert_eq!(store.commit(Batch::new().put("c", "after", json!(1))).await.unwrap().revision, 5);
    drop(store);
    let store = open_when_free(dir.path(), plain()).await;
    assert_eq!(ids(&store).await, ["after", "k2", "k3", "k4"]);
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_after_the_last_frame_is_dropped() {
    let source = five_commits(plain()).await;
    let journal = std::fs::read(source.path().join(JOURNAL_FILE)).unwrap();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut garbage = Vec::new();
    for _ in 0..4096 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        garbage.push(seed as u8);
    }
    // Random bytes, zeros (a preallocated tail), and a fake frame header with the magic.
    let mut fake_frame = vec![0xF7, b'H', b'F', 0x01, 10, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0];
    fake_frame.extend_from_slice(&[0xAB; 16 + 10]);
    for tail in [garbage.clone(), vec![0u8; 512], fake_frame, garbage[..3].to_vec()] {
        let mut damaged = journal.clone();
        damaged.extend_from_slice(&tail);
        let dir = copy_store(source.path(), &damaged);
        let store = JsonStore::open(dir.path(), plain()).await.unwrap();
        assert_eq!(store.revision().unwrap(), 5);
        assert_eq!(ids(&store).await, ["k2", "k3", "k4", "k5"]);
        drop(store);
        assert_eq!(std::fs::read(dir.path().join(JOURNAL_FILE)).unwrap(), journal, "garbage must be cut");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn damage_in_the_middle_is_refused_unless_salvaged() {
    let source = five_commits(plain()).await;
    let journal = std::fs::read(source.path().join(JOURNAL_FILE)).unwrap();
    let starts = frame_starts(&journal);
    // Flip one byte in the payload of the second frame, and separately in its length.
    for at in [starts[1] + FRAME_HEADER_LEN + 3, starts[1] + 5] {
        let mut damaged = journal.clone();
        damaged[at] ^= 0x40;
        let dir = copy_store(source.path(), &damaged);
        match JsonStore::open(dir.path(), plain()).await {
            Err(StoreError::Corrupt { path, detail }) => {
                assert!(path.ends_with(JOURNAL_FILE), "{path}");
                assert!(detail.contains(&format!("offset {}", starts[1])), "{detail}");
            }
            other => panic!("flipped byte at {at}: expected Corrupt, got {other:?}"),
        }
        assert_eq!(std::fs::read(dir.path().join(JOURNAL_FILE)).unwrap(), damaged, "refusal must change nothing");
        let salvage = JsonStoreOptions { salvage_damaged_journal: true, ..plain() };
        let store = JsonStore::open(dir.path(), salvage).await.unwrap();
        assert_eq!(store.revision().unwrap(), 1);
        assert_eq!(ids(&store).await, ["k1"]);
        store.close().await.unwrap();
    }
    // A damaged header or snapshot is Corrupt as well.
    let mut bad_header = journal.clone();
    bad_header[20] ^= 1;
    let dir = copy_store(source.path(), &bad_header);
    assert!(matches!(JsonStore::open(dir.path(), plain()).await, Err(StoreError::Corrupt { .. })));
    let dir = copy_store(source.path(), &journal);
    std::fs::write(dir.path().join(SNAPSHOT_FILE), b"{\"format\": \"hangar-json-st").unwrap();
    match JsonStore::open(dir.path(), plain()).await {
        Err(StoreError::Corrupt { path, .. }) => assert!(path.ends_with(SNAPSHOT_FILE)),
        other => panic!("expected Corrupt for a damaged snapshot, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn leftover_temp_files_are_ignored_and_removed() {
    let source = five_commits(plain()).await;
    let tmp_snapshot = source.path().join("data.json.tmp");
    let tmp_journal = source.path().join("journal.log.tmp");
    std::fs::write(&tmp_snapshot, b"half a snapsh").unwrap();
    std::fs::write(&tmp_journal, b"HNGR").unwrap();
    let store = JsonStore::open(source.path(), plain()).await.unwrap();
    assert_eq!(store.revision().unwrap(), 5);
    assert!(!tmp_snapshot.exists() && !tmp_journal.exists(), "temp files must be removed");
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn compaction_interrupted_before_the_journal_reset_replays_nothing_twice() {
    let source = five_commits(plain()).await;
    let old_journal = std::fs::read(source.path().join(JOURNAL_FILE)).unwrap();
    let store = JsonStore::open(source.path(), plain()).await.unwrap();
    store.compact_now().await.unwrap();
    store.close().await.unwrap();
    // Simulate a crash between the rename of data.json and the rename of the new journal.
    std::fs::write(source.path().join(JOURNAL_FILE), &old_journal).unwrap();
    let store = JsonStore::open(source.path(), plain()).await.unwrap();
    assert_eq!(store.revision().unwrap(), 5);
    assert_eq!(ids(&store).await, ["k2", "k3", "k4", "k5"]);
    assert_eq!(store.commit(Batch::new().put("c", "k6", json!(6))).await.unwrap().revision, 6);
    drop(store);
    let store = open_when_free(source.path(), plain()).await;
    assert_eq!(ids(&store).await, ["k2", "k3", "k4", "k5", "k6"]);
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn compaction_policy_keeps_the_journal_short() {
    let dir = tempfile::tempdir().unwrap();
    let options = JsonStoreOptions { compact_journal_frames: 4, ..plain() };
    let store = JsonStore::open(dir.path(), options.clone()).await.unwrap();
    for i in 0..10 {
        store.commit(Batch::new().put("c", &format!("k{i:02}"), json!(i))).await.unwrap();
    }
    let journal = std::fs::read(dir.path().join(JOURNAL_FILE)).unwrap();
    assert!(frame_starts(&journal).len() < 4, "the journal must be compacted after 4 frames");
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(SNAPSHOT_FILE)).unwrap()).unwrap();
    assert_eq!(doc["revision"], json!(8));
    drop(store);
    let store = open_when_free(dir.path(), options).await;
    assert_eq!(store.list("c").await.unwrap().len(), 10);
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn import_is_durable_without_close() {
    let dir = tempfile::tempdir().unwrap();
    let store = JsonStore::open(dir.path(), plain()).await.unwrap();
    store.commit(Batch::new().put("old", "x", json!(1))).await.unwrap();
    let mut dump = store.export().await.unwrap();
    dump.collections.clear();
    dump.collections.insert("new".into(), [("y".to_string(), json!("imported"))].into_iter().collect());
    store.import(dump).await.unwrap();
    store.commit(Batch::new().put("new", "z", json!("after"))).await.unwrap();
    drop(store);
    let store = open_when_free(dir.path(), plain()).await;
    assert!(store.get("old", "x").await.unwrap().is_none());
    assert_eq!(store.get("new", "y").await.unwrap().unwrap().value, json!("imported"));
    assert_eq!(store.get("new", "z").await.unwrap().unwrap().value, json!("after"));
    store.close().await.unwrap();
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread")]
async fn encryption_round_trip_and_key_errors() {
    let key_dir = tempfile::tempdir().unwrap();
    let key = EncryptionKey::generate().unwrap();
    let key_file = key_dir.path().join("store.key");
    std::fs::write(&key_file, format!("{}\n", key.to_hex())).unwrap();
    let key = EncryptionKey::from_file(&key_file).unwrap();
    let secret = "correct horse battery staple";

    let dir = tempfile::tempdir().unwrap();
    let store = JsonStore::open(dir.path(), with_key(&key)).await.unwrap();
    assert!(store.is_encrypted());
    store.commit(Batch::new().put("secrets", "s1", json!({"password": secret}))).await.unwrap();
    store.commit(Batch::new().put("secrets", "s2", json!(secret))).await.unwrap();
    let journal = std::fs::read(dir.path().join(JOURNAL_FILE)).unwrap();
    assert_eq!(frame_starts(&journal).len(), 2);
    assert!(!contains(&journal, secret.as_bytes()) && !contains(&journal, b"secrets"), "journal leaks plaintext");
    // export is plain JSON even for an encrypted store.
    let dump = store.export().await.unwrap();
    assert_eq!(dump.collections["secrets"]["s2"], json!(secret));
    drop(store);

    // Journal replay with the right key.
    let store = open_when_free(dir.path(), with_key(&key)).await;
    assert_eq!(store.get("secrets", "s1").await.unwrap().unwrap().value, json!({"password": secret}));
    store.close().await.unwrap();
    let snapshot = std::fs::read(dir.path().join(SNAPSHOT_FILE)).unwrap();
    assert!(!contains(&snapshot, secret.as_bytes()), "snapshot leaks plaintext");
    let doc: serde_json::Value = serde_json::from_slice(&snapshot).unwrap();
    assert_eq!(doc["encryption"], json!("AES-256-GCM"));

    let wrong = EncryptionKey::generate().unwrap();
    assert!(matches!(JsonStore::open(dir.path(), with_key(&wrong)).await, Err(StoreError::WrongKey { .. })));
    match JsonStore::open(dir.path(), plain()).await {
        Err(StoreError::Invalid(msg)) => assert!(msg.contains("encrypted"), "{msg}"),
        other => panic!("opening an encrypted store without a key: {other:?}"),
    }
    // The same with frames in the journal (no snapshot to fail first on a fresh store).
    let dir2 = tempfile::tempdir().unwrap();
    let store = JsonStore::open(dir2.path(), with_key(&key)).await.unwrap();
    store.commit(Batch::new().put("secrets", "s", json!(1))).await.unwrap();
    drop(store);
    let store = open_when_free(dir2.path(), with_key(&key)).await;
    drop(store);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match JsonStore::open(dir2.path(), with_key(&wrong)).await {
            Err(StoreError::WrongKey { .. }) => break,
            Err(StoreError::Locked { .. }) if Instant::now() < deadline => tokio::task::yield_now().await,
            other => panic!("wrong key with a journal: {other:?}"),
        }
    }
    // Frames are bound to their revision: swapping two encrypted payloads (with checksums
    // recomputed, as an attacker could) is caught as WrongKey, never loaded.
    let store = JsonStore::open(dir2.path(), with_key(&key)).await.unwrap();
    store.commit(Batch::new().put("secrets", "t", json!(2))).await.unwrap();
    drop(store);
    let store = open_when_free(dir2.path(), with_key(&key)).await;
    store.close().await.unwrap();
    let store = JsonStore::open(dir2.path(), with_key(&key)).await.unwrap();
    store.commit(Batch::new().put("secrets", "u", json!(3))).await.unwrap();
    store.commit(Batch::new().put("secrets", "v", json!(4))).await.unwrap();
    drop(store);
    let store = open_when_free(dir2.path(), with_key(&key)).await;
    let base = store.revision().unwrap() - 2;
    drop(store);
    let journal = std::fs::read(dir2.path().join(JOURNAL_FILE)).unwrap();
    let starts = frame_starts(&journal);
    assert_eq!(starts.len(), 2);
    let payload = |i: usize| {
        let end = if i + 1 < starts.len() { starts[i + 1] } else { journal.len() };
        journal[starts[i] + FRAME_HEADER_LEN..end].to_vec()
    };
    let journal_id = &journal[16..32];
    let mut swapped = journal[..HEADER_LEN].to_vec();
    for (revision, body) in [(base + 1, payload(1)), (base + 2, payload(0))] {
        let len = (body.len() as u32).to_le_bytes();
        let rev = revision.to_le_bytes();
        let mut hasher = blake3::Hasher::new();
        for part in [journal_id, &len[..], &rev[..], &body[..]] {
            hasher.update(part);
        }
        swapped.extend_from_slice(&[0xF7, b'H', b'F', 0x01]);
        swapped.extend_from_slice(&len);
        swapped.extend_from_slice(&rev);
        swapped.extend_from_slice(&hasher.finalize().as_bytes()[..16]);
        swapped.extend_from_slice(&body);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    std::fs::write(dir2.path().join(JOURNAL_FILE), &swapped).unwrap();
    loop {
        match JsonStore::open(dir2.path(), with_key(&key)).await {
            Err(StoreError::WrongKey { .. }) => break,
            Err(StoreError::Locked { .. }) if Instant::now() < deadline => tokio::task::yield_now().await,
            other => panic!("reordered frames: {other:?}"),
        }
    }
    // The untouched journal still opens (the test's frame rebuilding is faithful).
    std::fs::write(dir2.path().join(JOURNAL_FILE), &journal).unwrap();
    let store = JsonStore::open(dir2.path(), with_key(&key)).await.unwrap();
    assert_eq!(store.get("secrets", "v").await.unwrap().unwrap().value, json!(4));
    store.close().await.unwrap();

    // A plain store refuses a key.
    let plain_dir = five_commits(plain()).await;
    match JsonStore::open(plain_dir.path(), with_key(&key)).await {
        Err(StoreError::Invalid(msg)) => assert!(msg.contains("not encrypted"), "{msg}"),
        other => panic!("opening a plain store with a key: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn second_open_in_the_same_process_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = JsonStore::open(dir.path(), plain()).await.unwrap();
    match JsonStore::open(dir.path(), plain()).await {
        Err(StoreError::Locked { path, lock }) => {
            assert_eq!(path, dir.path().display().to_string());
            assert!(lock.ends_with(LOCK_FILE));
        }
        other => panic!("second open: {other:?}"),
    }
    store.close().await.unwrap();
    let again = JsonStore::open(dir.path(), plain()).await.unwrap();
    again.close().await.unwrap();
}

fn helper(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_store-crash-writer"));
    cmd.args(args);
    cmd
}

#[tokio::test(flavor = "multi_thread")]
async fn second_open_from_another_process_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let dir_arg = dir.path().to_str().unwrap();
    // We hold it; the other process is refused.
    let store = JsonStore::open(dir.path(), plain()).await.unwrap();
    let out = helper(&["try-open", dir_arg]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "locked");
    store.close().await.unwrap();
    let out = helper(&["try-open", dir_arg]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "opened");

    // The other process holds it; we are refused until it closes.
    let mut child = helper(&["hold", dir_arg]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "held");
    assert!(matches!(JsonStore::open(dir.path(), plain()).await, Err(StoreError::Locked { .. })));
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"bye\n").unwrap();
    drop(stdin);
    assert_eq!(lines.next().unwrap().unwrap(), "closed");
    assert!(child.wait().unwrap().success());
    let store = JsonStore::open(dir.path(), plain()).await.unwrap();
    store.close().await.unwrap();
}

fn names(files: &[PathBuf]) -> BTreeSet<String> {
    files.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn scheduled_backups_are_taken_and_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let options = JsonStoreOptions { backup_interval: Some(Duration::from_millis(20)), backup_retention: 3, ..plain() };
    let store = JsonStore::open(dir.path(), options).await.unwrap();
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = 0;
    while seen.len() < 8 {
        assert!(Instant::now() < deadline, "only {} backups within 30 s", seen.len());
        store.commit(Batch::new().put("c", &format!("k{i}"), json!(i))).await.unwrap();
        i += 1;
        let now = backup_files(dir.path()).unwrap();
        // A new backup is made durable before the oldest is removed, so 4 can show briefly.
        assert!(now.len() <= 4, "retention exceeded: {:?}", names(&now));
        seen.extend(names(&now));
        tokio::task::yield_now().await;
    }
    let path = store.backup_now().await.unwrap();
    let kept = backup_files(dir.path()).unwrap();
    assert_eq!(kept.len(), 3);
    assert_eq!(kept.last(), Some(&path), "backup_now must write the newest backup");
    assert!(path.starts_with(dir.path().join(BACKUP_DIR)));
    assert!(names(&kept).iter().all(|n| n.starts_with("data-") && n.ends_with("Z.json")), "{kept:?}");
    // The backup is a consistent snapshot: it opens as a store holding every commit so far.
    let restored = tempfile::tempdir().unwrap();
    std::fs::copy(&path, restored.path().join(SNAPSHOT_FILE)).unwrap();
    let copy = JsonStore::open(restored.path(), plain()).await.unwrap();
    assert_eq!(copy.list("c").await.unwrap().len(), i);
    assert_eq!(copy.revision().unwrap(), store.revision().unwrap());
    copy.close().await.unwrap();
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn backups_of_an_encrypted_store_are_encrypted() {
    let key = EncryptionKey::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let options = JsonStoreOptions { backup_retention: 2, ..with_key(&key) };
    let store = JsonStore::open(dir.path(), options).await.unwrap();
    for i in 0..3 {
        store.commit(Batch::new().put("secrets", "s", json!(format!("hidden-value-{i}")))).await.unwrap();
        store.backup_now().await.unwrap();
    }
    let kept = backup_files(dir.path()).unwrap();
    assert_eq!(kept.len(), 2, "retention 2: {kept:?}");
    let newest = std::fs::read(kept.last().unwrap()).unwrap();
    assert!(!contains(&newest, b"hidden-value"), "backup leaks plaintext");
    let restored = tempfile::tempdir().unwrap();
    std::fs::write(restored.path().join(SNAPSHOT_FILE), &newest).unwrap();
    assert!(matches!(
        JsonStore::open(restored.path(), with_key(&EncryptionKey::generate().unwrap())).await,
        Err(StoreError::WrongKey { .. })
    ));
    let copy = JsonStore::open(restored.path(), with_key(&key)).await.unwrap();
    assert_eq!(copy.get("secrets", "s").await.unwrap().unwrap().value, json!("hidden-value-2"));
    copy.close().await.unwrap();
    store.close().await.unwrap();
}
