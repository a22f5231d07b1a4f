//! Catalog figures on a local-folder provider and the JSON store: registration rate,
//! list and `latest` latency with many manifests, host pulls cold and from the cache.
//! Run: `cargo bench -p hangar-catalog --bench catalog_ops` (HANGAR_BENCH_MANIFESTS,
//! HANGAR_BENCH_IMAGE_MIB to change the sizes).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use hangar_catalog::hangar_blobstore;
use hangar_catalog::hangar_image::{self, testimage};
use hangar_catalog::service::manifest_key;
use hangar_catalog::{Architecture, Catalog, CatalogOptions, NewManifest};
use hangar_core::audit::Actor;
use hangar_core::{AuthMethod, EventBus, Principal};
use hangar_store::{JsonStore, JsonStoreOptions, Store};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let manifests = env_num("HANGAR_BENCH_MANIFESTS", 500);
    let image_mib = env_num("HANGAR_BENCH_IMAGE_MIB", 64);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let store: Arc<dyn Store> =
        Arc::new(JsonStore::open(root.join("store"), JsonStoreOptions::default()).await.unwrap());
    let catalog = Catalog::new(store, EventBus::default(), CatalogOptions::new(root.join("data"))).unwrap();
    let connection = format!("provider=local-storage;catalog_path={}", root.join("provider").display());
    let provider = hangar_blobstore::open_connection_string(&connection).unwrap();
    let p = Principal {
        user_id: "root".into(),
        username: "root".into(),
        email: "root@x".into(),
        roles: BTreeSet::from(["SUPER_USER".to_string()]),
        claims: BTreeSet::new(),
        method: AuthMethod::Jwt,
    };
    let actor = Actor::system();
    let x = Architecture::X86_64;

    let image = root.join("image");
    testimage::generate(&image, image_mib << 20, 1).unwrap();
    let t = Instant::now();
    hangar_image::push(provider.clone(), &image, &manifest_key("img", "1.0.0", x), &Default::default()).await.unwrap();
    let push_s = t.elapsed().as_secs_f64();
    let raw = provider.get(&manifest_key("img", "1.0.0", x)).await.unwrap();

    // Registration: the image manifest copied under many versions, each registered.
    let t = Instant::now();
    for i in 0..manifests {
        let v = format!("1.{i}.0");
        provider.put(&manifest_key("img", &v, x), raw.clone()).await.unwrap();
        let m = NewManifest {
            catalog_id: "img".into(),
            version: v,
            architecture: "x86_64".into(),
            connection: connection.clone(),
            ..Default::default()
        };
        catalog.register(&p, &actor, m).await.unwrap();
    }
    let reg = t.elapsed().as_secs_f64();

    let rounds = 20;
    let t = Instant::now();
    for _ in 0..rounds {
        assert_eq!(catalog.list(&p).await.unwrap().len() as u64, manifests);
    }
    let list_ms = t.elapsed().as_secs_f64() * 1000.0 / rounds as f64;
    let t = Instant::now();
    for _ in 0..rounds {
        catalog.get(&p, "img", "latest", x).await.unwrap();
    }
    let latest_ms = t.elapsed().as_secs_f64() * 1000.0 / rounds as f64;

    let t = Instant::now();
    let path = catalog.pull_to_host(&p, &actor, "img", "1.0.0", x).await.unwrap();
    let cold = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let again = catalog.pull_to_host(&p, &actor, "img", "1.0.0", x).await.unwrap();
    let warm_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(path, again);
    // Another version with the same chunks: built from the chunk cache, no provider reads.
    let t = Instant::now();
    catalog.pull_to_host(&p, &actor, "img", "1.1.0", x).await.unwrap();
    let from_chunks = t.elapsed().as_secs_f64();

    let mib = image_mib as f64;
    println!("catalog_ops: image {image_mib} MiB, {manifests} manifests (local-folder provider, JSON store)");
    println!("  push (hangar-image)            {push_s:8.2} s   {:8.1} MiB/s", mib / push_s);
    println!(
        "  register                       {:8.2} ms/manifest ({:.0}/s)",
        reg * 1000.0 / manifests as f64,
        manifests as f64 / reg
    );
    println!("  list all                       {list_ms:8.2} ms");
    println!("  resolve latest                 {latest_ms:8.2} ms");
    println!("  pull_to_host, cold             {cold:8.2} s   {:8.1} MiB/s", mib / cold);
    println!("  pull_to_host, already cached   {warm_ms:8.2} ms");
    println!("  pull_to_host, from chunk cache {from_chunks:8.2} s   {:8.1} MiB/s", mib / from_chunks);
}
