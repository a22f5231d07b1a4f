//! The catalog service on a real JSON store and a real local-folder provider:
//! visibility, `latest`, taint/revoke, download counts, audit and events,
//! the host cache, remote cleanup, sealed connections and reference imports.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use hangar_catalog::hangar_blobstore::{self, BlobStore};
use hangar_catalog::hangar_image::{self, testimage};
use hangar_catalog::service::manifest_key;
use hangar_catalog::{Architecture, Catalog, CatalogError, CatalogOptions, ImportRequest, NewManifest};
use hangar_core::audit::{AUDIT_COLLECTION, Actor};
use hangar_core::{AuthMethod, EventBus, Principal};
use hangar_store::{JsonStore, JsonStoreOptions, Store};

struct Env {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    store: Arc<dyn Store>,
    catalog: Catalog,
    bus: EventBus,
    connection: String,
    provider: Arc<dyn BlobStore>,
    image: std::path::PathBuf,
}

fn principal(name: &str, roles: &[&str], claims: &[&str]) -> Principal {
    Principal {
        user_id: format!("id-{name}"),
        username: name.into(),
        email: format!("{name}@example.test"),
        roles: roles.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>(),
        claims: claims.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>(),
        method: AuthMethod::Jwt,
    }
}

fn actor(p: &Principal) -> Actor {
    Actor { user_id: p.user_id.clone(), username: p.username.clone(), via: "jwt".into(), ..Default::default() }
}

async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let store: Arc<dyn Store> =
        Arc::new(JsonStore::open(root.join("store"), JsonStoreOptions::default()).await.unwrap());
    let bus = EventBus::default();
    let mut options = CatalogOptions::new(root.join("data"));
    // Unused packs go at the first GC run after they are found unused.
    options.gc_grace = std::time::Duration::ZERO;
    let catalog = Catalog::new(store.clone(), bus.clone(), options).unwrap();
    let connection = format!("provider=local-storage;catalog_path={}", root.join("provider").display());
    let provider = hangar_blobstore::open_connection_string(&connection).unwrap();
    let image = root.join("image");
    testimage::generate(&image, 3 << 20, 7).unwrap();
    Env { _dir: dir, root, store, catalog, bus, connection, provider, image }
}

impl Env {
    async fn upload(&self, id: &str, version: &str, arch: Architecture) {
        self.upload_as(id, version, arch, hangar_image::ImageFormat::default()).await;
    }

    async fn upload_as(&self, id: &str, version: &str, arch: Architecture, format: hangar_image::ImageFormat) {
        hangar_image::push(
            self.provider.clone(),
            &self.image,
            &manifest_key(id, version, arch),
            &hangar_image::PushOptions { format, ..Default::default() },
        )
        .await
        .unwrap();
    }

    fn new_manifest(&self, id: &str, version: &str, arch: &str) -> NewManifest {
        NewManifest {
            catalog_id: id.into(),
            version: version.into(),
            architecture: arch.into(),
            connection: self.connection.clone(),
            ..Default::default()
        }
    }

    async fn push(&self, by: &Principal, id: &str, version: &str, claims: &[&str]) {
        self.upload(id, version, Architecture::X86_64).await;
        let mut m = self.new_manifest(id, version, "amd64");
        m.required_claims = claims.iter().map(|s| s.to_string()).collect();
        self.catalog.register(by, &actor(by), m).await.unwrap();
    }

    async fn audit_count(&self) -> usize {
        self.store.list(AUDIT_COLLECTION).await.unwrap().len()
    }
}

#[tokio::test]
async fn register_checks_the_image_is_really_in_the_provider() {
    let e = env().await;
    let root = principal("root", &["SUPER_USER"], &[]);
    // Nothing uploaded yet.
    let err = e.catalog.register(&root, &actor(&root), e.new_manifest("ubuntu", "1.0.0", "x86_64")).await.unwrap_err();
    assert!(matches!(err, CatalogError::Unprocessable(_)), "{err}");
    assert!(err.to_string().contains("push the image first"), "{err}");
    // A pack (format 2) or a chunk (format 1) goes missing after the upload:
    // refused, naming the problem.
    for (format, prefix) in
        [(hangar_image::ImageFormat::Packed, "packs"), (hangar_image::ImageFormat::Chunks, "chunks")]
    {
        e.upload_as("ubuntu", "1.0.0", Architecture::X86_64, format).await;
        let objects = e.provider.list(prefix).await.unwrap();
        e.provider.delete(&objects[0].key).await.unwrap();
        let err =
            e.catalog.register(&root, &actor(&root), e.new_manifest("ubuntu", "1.0.0", "x86_64")).await.unwrap_err();
        assert!(err.to_string().contains("missing from the provider"), "{format:?}: {err}");
    }
    // Bad inputs are 400s.
    for (id, v, a) in
        [("ubuntu", "1.0.0", "sparc"), ("../x", "1", "arm64"), ("cache", "1", "arm64"), ("u", "a b", "arm64")]
    {
        let err = e.catalog.register(&root, &actor(&root), e.new_manifest(id, v, a)).await.unwrap_err();
        assert!(matches!(err, CatalogError::Invalid(_)), "{id} {v} {a}: {err}");
    }
    let mut bad = e.new_manifest("ubuntu", "1.0.0", "x86_64");
    bad.connection = "provider=aws-s3;bucket=b;secret_key=HUSH-123;colour=red".into();
    let err = e.catalog.register(&root, &actor(&root), bad).await.unwrap_err();
    assert!(matches!(err, CatalogError::Invalid(_)), "{err}");
    assert!(!err.to_string().contains("HUSH-123"), "{err}");
}

#[tokio::test]
async fn required_claims_hide_and_block_and_super_user_sees_all() {
    let e = env().await;
    let root = principal("root", &["SUPER_USER"], &[]);
    let alice = principal("alice", &["USER"], &["TEAM_A"]);
    let bob = principal("bob", &["USER"], &[]);
    e.push(&root, "secret-os", "1.0.0", &["team_a"]).await;
    e.push(&root, "open-os", "1.0.0", &[]).await;

    let ids = |v: Vec<hangar_catalog::Manifest>| v.into_iter().map(|m| m.catalog_id).collect::<Vec<_>>();
    assert_eq!(ids(e.catalog.list(&root).await.unwrap()), ["open-os", "secret-os"]);
    assert_eq!(ids(e.catalog.list(&alice).await.unwrap()), ["open-os", "secret-os"]);
    assert_eq!(ids(e.catalog.list(&bob).await.unwrap()), ["open-os"]);

    let x = Architecture::X86_64;
    for err in [
        e.catalog.get(&bob, "secret-os", "1.0.0", x).await.unwrap_err(),
        e.catalog.get(&bob, "secret-os", "latest", x).await.unwrap_err(),
        e.catalog.get_id(&bob, "SECRET-OS").await.unwrap_err(),
        e.catalog.pull(&bob, &actor(&bob), "secret-os", "1.0.0", x).await.unwrap_err(),
        e.catalog.taint(&bob, &actor(&bob), "secret-os", "1.0.0", x, None).await.unwrap_err(),
        e.catalog.delete(&bob, &actor(&bob), "secret-os", None, None, false).await.unwrap_err(),
    ] {
        assert!(matches!(err, CatalogError::NotFound(_)), "{err}");
    }
    // Bob cannot fetch its chunks either, even knowing their hashes.
    let t = e.catalog.pull(&alice, &actor(&alice), "secret-os", "1.0.0", x).await.unwrap();
    let image = hangar_image::Manifest::from_json(&t.image_manifest).unwrap();
    let hash = image
        .files()
        .flat_map(|(_, _, c)| c.iter())
        .find_map(|c| match c {
            hangar_image::ChunkRef::Data { hash, .. } => Some(hash.clone()),
            _ => None,
        })
        .unwrap();
    assert!(matches!(e.catalog.read_chunk(&bob, "secret-os", "1.0.0", x, &hash).await, Err(CatalogError::NotFound(_))));
    assert!(!e.catalog.read_chunk(&alice, "secret-os", "1.0.0", x, &hash).await.unwrap().is_empty());
    // A chunk that is not part of the image is not served, to anyone.
    let other = "0".repeat(64);
    assert!(matches!(
        e.catalog.read_chunk(&root, "secret-os", "1.0.0", x, &other).await,
        Err(CatalogError::NotFound(_))
    ));
    assert!(matches!(
        e.catalog.read_chunk(&root, "secret-os", "1.0.0", x, "../x").await,
        Err(CatalogError::Invalid(_))
    ));
    // Download counting.
    let m = e.catalog.get(&root, "secret-os", "1.0.0", x).await.unwrap();
    assert_eq!(m.download_count, 1);
    assert_eq!(m.last_downloaded_user.as_deref(), Some("alice"));
    // Granting bob the claim makes it visible.
    let bob2 = principal("bob", &["USER"], &["TEAM_A"]);
    assert!(e.catalog.pull(&bob2, &actor(&bob2), "secret-os", "1.0.0", x).await.is_ok());
    // Required roles work the same way, with ALL semantics.
    e.catalog
        .patch_list(&root, &actor(&root), "open-os", "1.0.0", x, hangar_catalog::ListField::Roles, true, &["qa".into()])
        .await
        .unwrap();
    assert!(e.catalog.get(&alice, "open-os", "1.0.0", x).await.is_err());
    let carol = principal("carol", &["QA"], &[]);
    assert!(e.catalog.get(&carol, "open-os", "1.0.0", x).await.is_ok());
}

#[tokio::test]
async fn latest_taint_untaint_revoke() {
    let e = env().await;
    let root = principal("root", &["SUPER_USER"], &[]);
    let x = Architecture::X86_64;
    let mut events = e.bus.subscribe();
    for v in ["1.2.0", "1.10.0", "1.9.3"] {
        e.push(&root, "ci", v, &[]).await;
    }
    assert_eq!(e.catalog.get(&root, "ci", "latest", x).await.unwrap().version, "1.10.0");
    assert!(matches!(e.catalog.get(&root, "ci", "latest", Architecture::Arm64).await, Err(CatalogError::NotFound(_))));
    let before = e.audit_count().await;
    e.catalog.taint(&root, &actor(&root), "ci", "1.10.0", x, Some("broken network".into())).await.unwrap();
    assert_eq!(e.audit_count().await, before + 1, "taint writes one audit entry");
    let err = e.catalog.pull(&root, &actor(&root), "ci", "1.10.0", x).await.unwrap_err();
    assert!(matches!(err, CatalogError::Conflict(_)), "{err}");
    assert!(err.to_string().contains("tainted") && err.to_string().contains("broken network"), "{err}");
    // latest skips the tainted version.
    let t = e.catalog.pull(&root, &actor(&root), "ci", "latest", x).await.unwrap();
    assert_eq!(t.manifest.version, "1.9.3");
    e.catalog.untaint(&root, &actor(&root), "ci", "1.10.0", x).await.unwrap();
    assert_eq!(e.catalog.pull(&root, &actor(&root), "ci", "latest", x).await.unwrap().manifest.version, "1.10.0");
    e.catalog.revoke(&root, &actor(&root), "ci", "1.10.0", x).await.unwrap();
    e.catalog.untaint(&root, &actor(&root), "ci", "1.10.0", x).await.unwrap();
    let err = e.catalog.pull(&root, &actor(&root), "ci", "1.10.0", x).await.unwrap_err();
    assert!(err.to_string().contains("revoked"), "{err}");
    assert!(matches!(e.catalog.revoke(&root, &actor(&root), "ci", "1.10.0", x).await, Err(CatalogError::Conflict(_))));
    // A revoked version cannot be replaced either.
    let mut again = e.new_manifest("ci", "1.10.0", "x86_64");
    again.overwrite = true;
    assert!(matches!(e.catalog.register(&root, &actor(&root), again).await, Err(CatalogError::Conflict(_))));
    // Without overwrite an existing version is a conflict.
    let err = e.catalog.register(&root, &actor(&root), e.new_manifest("ci", "1.9.3", "x86_64")).await.unwrap_err();
    assert!(matches!(err, CatalogError::Conflict(_)), "{err}");
    // When every version is unpullable, latest says why.
    for v in ["1.2.0", "1.9.3"] {
        e.catalog.taint(&root, &actor(&root), "ci", v, x, None).await.unwrap();
    }
    let err = e.catalog.pull(&root, &actor(&root), "ci", "latest", x).await.unwrap_err();
    assert!(matches!(err, CatalogError::Conflict(_)) && err.to_string().contains("revoked"), "{err}");
    // Events were published for the changes.
    let mut messages = Vec::new();
    while let Ok(ev) = events.try_recv() {
        messages.push(ev.message);
    }
    for want in
        ["CATALOG_MANIFEST_PUSHED", "CATALOG_MANIFEST_TAINTED", "CATALOG_MANIFEST_PULLED", "CATALOG_MANIFEST_REVOKED"]
    {
        assert!(messages.iter().any(|m| m == want), "no {want} in {messages:?}");
    }
}

#[tokio::test]
async fn host_cache_and_clean_remote() {
    host_cache_and_clean_remote_in(hangar_image::ImageFormat::Packed, "packs").await;
    host_cache_and_clean_remote_in(hangar_image::ImageFormat::Chunks, "chunks").await;
}

async fn host_cache_and_clean_remote_in(format: hangar_image::ImageFormat, prefix: &str) {
    let e = env().await;
    let root = principal("root", &["SUPER_USER"], &[]);
    let x = Architecture::X86_64;
    for v in ["1.0.0", "2.0.0"] {
        e.upload_as("img", v, x, format).await;
        e.catalog.register(&root, &actor(&root), e.new_manifest("img", v, "amd64")).await.unwrap();
    }
    assert!(!e.provider.list(prefix).await.unwrap().is_empty(), "{format:?}: nothing under {prefix}");
    let want = testimage::fingerprint(&e.image).unwrap();

    let p1 = e.catalog.pull_to_host(&root, &actor(&root), "img", "1.0.0", x).await.unwrap();
    assert_eq!(testimage::fingerprint(&p1).unwrap(), want);
    let again = e.catalog.pull_to_host(&root, &actor(&root), "img", "1.0.0", x).await.unwrap();
    assert_eq!(again, p1);
    let items = e.catalog.cache_list().await.unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].used_count, 2);
    assert_eq!(e.catalog.get(&root, "img", "1.0.0", x).await.unwrap().download_count, 2);

    // Deleting 1.0.0 with clean_remote keeps the chunks (packs) 2.0.0 shares.
    let chunks_before = e.provider.list(prefix).await.unwrap().len();
    e.catalog.delete(&root, &actor(&root), "img", Some("1.0.0"), None, true).await.unwrap();
    assert!(e.provider.head(&manifest_key("img", "1.0.0", x)).await.unwrap().is_none());
    assert_eq!(e.provider.list(prefix).await.unwrap().len(), chunks_before);
    let p2 = e.catalog.pull_to_host(&root, &actor(&root), "img", "latest", x).await.unwrap();
    assert_eq!(testimage::fingerprint(&p2).unwrap(), want);
    // Deleting the last one cleans every chunk (pack and index; the grace is 0 here).
    e.catalog.delete(&root, &actor(&root), "img", None, None, true).await.unwrap();
    assert!(e.provider.list(prefix).await.unwrap().is_empty(), "{format:?}");
    assert!(e.provider.list("packidx").await.unwrap().is_empty(), "{format:?}");
    assert!(matches!(e.catalog.get_id(&root, "img").await, Err(CatalogError::NotFound(_))));

    // The cache is emptied on request, folders included.
    assert_eq!(e.catalog.cache_delete(&actor(&root), Some("img"), Some("1.0.0")).await.unwrap(), 1);
    assert!(!p1.exists());
    assert!(matches!(
        e.catalog.cache_delete(&actor(&root), Some("img"), Some("1.0.0")).await,
        Err(CatalogError::NotFound(_))
    ));
    assert_eq!(e.catalog.cache_delete(&actor(&root), None, None).await.unwrap(), 1);
    assert!(!p2.exists());
    assert!(e.catalog.cache_list().await.unwrap().is_empty());
}

fn grep_tree(dir: &Path, needle: &str) -> Vec<String> {
    let mut hits = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            hits.extend(grep_tree(&p, needle));
        } else if let Ok(bytes) = std::fs::read(&p)
            && bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
        {
            hits.push(p.display().to_string());
        }
    }
    hits
}

#[tokio::test]
async fn connection_strings_are_sealed_at_rest() {
    let e = env().await;
    let root = principal("root", &["SUPER_USER"], &[]);
    e.push(&root, "img", "1.0.0", &[]).await;
    // The store holds the connection only encrypted: its text is nowhere in the files.
    let hits = grep_tree(&e.root.join("store"), &e.connection);
    assert!(hits.is_empty(), "connection string in clear in {hits:?}");
    let key = e.root.join("data/secrets/catalog-providers.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    // And a manifest, as returned, has no connection string.
    let m = e.catalog.get(&root, "img", "1.0.0", Architecture::X86_64).await.unwrap();
    let text = serde_json::to_string(&m).unwrap();
    assert!(!text.contains("provider=") && !text.contains(&e.connection), "{text}");
    assert_eq!(m.provider_type, "local-storage");

    // The connection can be replaced by one that reaches the same image, not by another.
    let x = Architecture::X86_64;
    let same = format!("provider=local-storage;catalog_path={}/", e.root.join("provider").display());
    let m2 = e.catalog.set_connection(&root, &actor(&root), "img", "1.0.0", x, &same).await.unwrap();
    assert_ne!(m2.provider_id, m.provider_id);
    assert!(e.catalog.pull(&root, &actor(&root), "img", "1.0.0", x).await.is_ok());
    let elsewhere = format!("provider=local-storage;catalog_path={}", e.root.join("empty").display());
    let err = e.catalog.set_connection(&root, &actor(&root), "img", "1.0.0", x, &elsewhere).await.unwrap_err();
    assert!(matches!(err, CatalogError::Unprocessable(_)), "{err}");
    let bob = principal("bob", &["USER"], &[]);
    e.catalog
        .patch_list(&root, &actor(&root), "img", "1.0.0", x, hangar_catalog::ListField::Claims, true, &["X".into()])
        .await
        .unwrap();
    let err = e.catalog.set_connection(&bob, &actor(&bob), "img", "1.0.0", x, &same).await.unwrap_err();
    assert!(matches!(err, CatalogError::NotFound(_)), "{err}");
}

#[tokio::test]
async fn imports_a_reference_entry_from_meta_and_pdpack() {
    let e = env().await;
    let root = principal("root", &["SUPER_USER"], &[]);
    // A reference entry: <id>/<name>.meta and a tar.gz pack of a .pvm bundle.
    let bundle_parent = e.root.join("bundle");
    std::fs::create_dir(&bundle_parent).unwrap();
    let bundle = bundle_parent.join("Old Mac.pvm");
    testimage::generate(&bundle, 1 << 20, 9).unwrap();
    let pack_file = e.root.join("pack.tar.gz");
    {
        let f = std::fs::File::create(&pack_file).unwrap();
        let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        let mut t = tar::Builder::new(gz);
        t.follow_symlinks(false);
        t.append_dir_all("Old Mac.pvm", &bundle).unwrap();
        t.into_inner().unwrap().finish().unwrap();
    }
    let name = "oldmac-arm64-latest";
    let meta = serde_json::json!({
        "name": name, "catalog_id": "oldmac", "version": "latest", "architecture": "arm64",
        "description": "from PDS", "type": "pvm", "pack_path": format!("{name}.pdpack"),
        "tags": ["legacy"], "required_claims": [], "minimum_requirements": {"cpu": 4, "memory": 8192, "disk": 65536},
        "is_compressed": true,
    });
    e.provider.put(&format!("oldmac/{name}.meta"), serde_json::to_vec(&meta).unwrap().into()).await.unwrap();
    e.provider.put_file(&format!("oldmac/{name}.pdpack"), &pack_file).await.unwrap();

    let req = ImportRequest {
        connection: e.connection.clone(),
        catalog_id: "oldmac".into(),
        version: None,
        architecture: "aarch64".into(),
        meta_path: None,
        overwrite: false,
    };
    let m = e.catalog.import(&root, &actor(&root), req.clone()).await.unwrap();
    assert_eq!(
        (m.version.as_str(), m.architecture, m.description.as_str()),
        ("latest", Architecture::Arm64, "from PDS")
    );
    assert_eq!(m.tags, ["legacy"]);
    assert_eq!(m.minimum_requirements.unwrap().memory, 8192);
    assert!(m.imported_from.as_deref().unwrap().contains(".meta"));
    let got = e.catalog.pull_to_host(&root, &actor(&root), "oldmac", "latest", Architecture::Arm64).await.unwrap();
    assert_eq!(testimage::fingerprint(&got).unwrap(), testimage::fingerprint(&bundle).unwrap());
    // Importing again without overwrite is a conflict; a missing entry is a 422.
    assert!(matches!(e.catalog.import(&root, &actor(&root), req.clone()).await, Err(CatalogError::Conflict(_))));
    let mut missing = req;
    missing.catalog_id = "nothing".into();
    assert!(matches!(e.catalog.import(&root, &actor(&root), missing).await, Err(CatalogError::Unprocessable(_))));
}
