//! Embeds `console/dist` (the web console built by `scripts/build-console.sh`) into the
//! crate when it is there; otherwise the crate serves a page saying how to build it. The
//! Rust build never needs npm.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else if p.is_file() {
            out.push(p);
        }
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let console = manifest.join("../../console");
    let dist = console.join("dist");
    println!("cargo:rerun-if-env-changed=HANGAR_CONSOLE_DIST");
    let dist = std::env::var_os("HANGAR_CONSOLE_DIST").map(PathBuf::from).unwrap_or(dist);
    let built = dist.join("index.html").is_file();
    if built {
        // Cargo scans a directory for any change below it.
        println!("cargo:rerun-if-changed={}", dist.display());
    } else if console.is_dir() {
        // A build of the console creates `dist` in here, which changes this folder.
        println!("cargo:rerun-if-changed={}", console.display());
    }
    let mut list = Vec::new();
    if built {
        files(&dist, &mut list);
        list.sort();
    }
    let mut code = String::new();
    let _ = writeln!(code, "/// Whether `console/dist` was embedded.\npub const BUILT: bool = {built};");
    code.push_str("/// Every embedded file, by its path relative to `console/dist`.\n");
    code.push_str("pub static FILES: &[(&str, &[u8])] = &[\n");
    for f in &list {
        let Ok(rel) = f.strip_prefix(&dist) else { continue };
        let rel: Vec<String> = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
        let abs = f.canonicalize().unwrap_or_else(|_| f.clone());
        let _ = writeln!(code, "    ({:?}, include_bytes!({:?})),", rel.join("/"), abs.display().to_string());
    }
    code.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("embedded.rs");
    std::fs::write(out, code).expect("write embedded.rs");
}
