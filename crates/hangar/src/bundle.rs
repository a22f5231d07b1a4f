//! `hangar bundle`: one tarball for an air-gapped install.
//!
//! Layout, under one top folder `hangar-<version>/`:
//! `bin/hangar` (the binary: the running one unless `--binary`), `image/hangar-image.tar`
//! (a `docker save` archive, with `--image`), `helm/hangar/` (the chart, when there is one),
//! `compose/docker-compose.yml`, `install.sh` and `SHA256SUMS` (`sha256sum -c` format, every
//! other file). `install.sh` checks the sums, installs the binary, loads the image when a
//! Docker engine answers, copies the chart and the compose file, and uses no network.
//! The tarball is gzip-compressed when its name ends in `.gz` or `.tgz`.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use aws_lc_rs::digest;
use clap::Args;
use serde_json::{Value, json};

/// The installer every bundle carries.
const INSTALL_SH: &str = include_str!("bundle_install.sh");
/// Where the chart and the compose file are looked for when not given (from a clone's root).
const DEFAULT_CHART: &str = "deploy/helm/hangar";
const DEFAULT_COMPOSE: &str = "deploy/compose/docker-compose.yml";

#[derive(Args)]
pub struct BundleArgs {
    /// The tarball to write (gzip-compressed when it ends in .gz or .tgz).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// The binary to ship (default: this one; build a static one with scripts/build-static.sh).
    #[arg(long, value_name = "FILE")]
    pub binary: Option<PathBuf>,
    /// A `docker save` archive of the image (scripts/docker-image.sh --save FILE writes one).
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,
    /// The Helm chart folder (default: deploy/helm/hangar when it exists).
    #[arg(long, value_name = "DIR")]
    pub chart: Option<PathBuf>,
    /// The Compose file (default: deploy/compose/docker-compose.yml when it exists).
    #[arg(long, value_name = "FILE")]
    pub compose: Option<PathBuf>,
}

/// One file to put in the bundle: where it comes from (or its bytes) and its mode.
struct Entry {
    name: String,
    source: Source,
    mode: u32,
}

enum Source {
    File(PathBuf),
    Bytes(Vec<u8>),
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    ctx: digest::Context,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.ctx.update(&buf[..n]);
        Ok(n)
    }
}

/// A writer that counts and hashes what passes through it (the tarball's own sum).
struct Counting<W> {
    inner: W,
    ctx: digest::Context,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.ctx.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn hex(d: digest::Digest) -> String {
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The files of `dir`, recursively, sorted, as (path relative to `dir`, path); symbolic links
/// are refused (a bundle holds plain files only).
fn walk(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let mut stack = vec![(String::new(), dir.to_path_buf())];
    while let Some((rel, path)) = stack.pop() {
        let mut names: Vec<_> = std::fs::read_dir(&path)
            .with_context(|| format!("cannot read the folder {}", path.display()))?
            .collect::<std::io::Result<_>>()?;
        names.sort_by_key(|e| e.file_name());
        for e in names {
            let name = e.file_name().to_string_lossy().into_owned();
            let r = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            let t = e.file_type()?;
            if t.is_dir() {
                stack.push((r, e.path()));
            } else if t.is_file() {
                out.push((r, e.path()));
            } else {
                bail!("{} is neither a file nor a folder; a bundle holds plain files only", e.path().display());
            }
        }
    }
    out.sort();
    Ok(out)
}

fn mode_of(path: &Path) -> Result<u32> {
    use std::os::unix::fs::PermissionsExt;
    let m = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !m.is_file() {
        bail!("{} is not a file", path.display());
    }
    Ok(if m.permissions().mode() & 0o111 != 0 { 0o755 } else { 0o644 })
}

/// What goes into the bundle, in order (SHA256SUMS is added after them).
fn entries(args: &BundleArgs) -> Result<Vec<Entry>> {
    let binary = match &args.binary {
        Some(b) => b.clone(),
        None => std::env::current_exe().context("cannot find this binary; give it with --binary")?,
    };
    mode_of(&binary).with_context(|| format!("the binary {} cannot be bundled", binary.display()))?;
    let mut v = vec![Entry { name: "bin/hangar".into(), source: Source::File(binary), mode: 0o755 }];
    if let Some(img) = &args.image {
        mode_of(img).with_context(|| format!("the image archive {} cannot be bundled", img.display()))?;
        v.push(Entry { name: "image/hangar-image.tar".into(), source: Source::File(img.clone()), mode: 0o644 });
    }
    let chart = match &args.chart {
        Some(c) if !c.is_dir() => bail!("--chart {}: no such folder", c.display()),
        Some(c) => Some(c.clone()),
        None => Some(PathBuf::from(DEFAULT_CHART)).filter(|c| c.is_dir()),
    };
    if let Some(c) = chart {
        for (rel, path) in walk(&c)? {
            let mode = mode_of(&path)?;
            v.push(Entry { name: format!("helm/hangar/{rel}"), source: Source::File(path), mode });
        }
    }
    let compose = match &args.compose {
        Some(c) => Some(c.clone()),
        None => Some(PathBuf::from(DEFAULT_COMPOSE)).filter(|c| c.is_file()),
    };
    if let Some(c) = compose {
        mode_of(&c).with_context(|| format!("the compose file {} cannot be bundled", c.display()))?;
        v.push(Entry { name: "compose/docker-compose.yml".into(), source: Source::File(c), mode: 0o644 });
    }
    v.push(Entry { name: "install.sh".into(), source: Source::Bytes(INSTALL_SH.as_bytes().to_vec()), mode: 0o755 });
    Ok(v)
}

fn header(size: u64, mode: u32, mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(mtime);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(tar::EntryType::Regular);
    h
}

/// One file written: its name in the bundle, its SHA-256 (hex) and its size.
type Written = (String, String, u64);

/// Writes the bundle to `w`; answers what it wrote, file by file.
fn write_tar<W: Write>(w: W, top: &str, entries: Vec<Entry>, mtime: u64) -> Result<(W, Vec<Written>)> {
    let mut tar = tar::Builder::new(w);
    let mut sums = Vec::new();
    for e in entries {
        let path = format!("{top}/{}", e.name);
        let (reader, size): (Box<dyn Read>, u64) = match e.source {
            Source::File(p) => {
                let f = File::open(&p).with_context(|| format!("cannot open {}", p.display()))?;
                let size = f.metadata()?.len();
                (Box::new(f), size)
            }
            Source::Bytes(b) => {
                let n = b.len() as u64;
                (Box::new(std::io::Cursor::new(b)), n)
            }
        };
        let mut r = Hashing { inner: reader.take(size), ctx: digest::Context::new(&digest::SHA256) };
        let mut h = header(size, e.mode, mtime);
        tar.append_data(&mut h, &path, &mut r).with_context(|| format!("cannot add {} to the bundle", e.name))?;
        sums.push((e.name, hex(r.ctx.finish()), size));
    }
    let text: String = sums.iter().map(|(n, s, _)| format!("{s}  {n}\n")).collect();
    let mut h = header(text.len() as u64, 0o644, mtime);
    tar.append_data(&mut h, format!("{top}/SHA256SUMS"), text.as_bytes())?;
    Ok((tar.into_inner()?, sums))
}

/// Runs `hangar bundle`; answers what it wrote.
pub fn run(args: BundleArgs) -> Result<Value> {
    let entries = entries(&args)?;
    let top = format!("hangar-{}", env!("CARGO_PKG_VERSION"));
    let mtime = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| chrono::Utc::now().timestamp().max(0) as u64);
    let name = args.out.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let gzip = name.ends_with(".gz") || name.ends_with(".tgz");
    let tmp = args.out.with_file_name(format!(".{name}.partial"));
    let file = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let counting = Counting { inner: BufWriter::new(file), ctx: digest::Context::new(&digest::SHA256), bytes: 0 };
    let result = (|| {
        let (counting, sums) = if gzip {
            let gz = flate2::write::GzEncoder::new(counting, flate2::Compression::default());
            let (gz, sums) = write_tar(gz, &top, entries, mtime)?;
            (gz.finish()?, sums)
        } else {
            write_tar(counting, &top, entries, mtime)?
        };
        let Counting { inner, ctx, bytes } = counting;
        let file = inner.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok::<_, anyhow::Error>((sums, hex(ctx.finish()), bytes))
    })();
    let (sums, sha256, bytes) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.context(format!("cannot write the bundle {}", args.out.display())));
        }
    };
    std::fs::rename(&tmp, &args.out).with_context(|| format!("cannot write {}", args.out.display()))?;
    let files: Vec<Value> = sums.iter().map(|(n, s, b)| json!({"name": n, "sha256": s, "bytes": b})).collect();
    Ok(json!({"file": args.out.display().to_string(), "bytes": bytes, "sha256": sha256, "top": top, "files": files}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(b: &[u8]) -> String {
        hex(digest::digest(&digest::SHA256, b))
    }

    #[test]
    fn a_bundle_lists_every_file_with_its_sum() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let bin = dir.path().join("hangar");
        std::fs::write(&bin, b"#!/bin/sh\necho hi\n")?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
        }
        let chart = dir.path().join("chart");
        std::fs::create_dir_all(chart.join("templates"))?;
        std::fs::write(chart.join("Chart.yaml"), b"name: hangar\n")?;
        std::fs::write(chart.join("templates/a.yaml"), b"kind: Service\n")?;
        let compose = dir.path().join("compose.yml");
        std::fs::write(&compose, b"services: {}\n")?;
        for out in ["b.tar", "b.tar.gz"] {
            let args = BundleArgs {
                out: dir.path().join(out),
                binary: Some(bin.clone()),
                image: None,
                chart: Some(chart.clone()),
                compose: Some(compose.clone()),
            };
            let v = run(args)?;
            let file = File::open(dir.path().join(out))?;
            let reader: Box<dyn Read> =
                if out.ends_with(".gz") { Box::new(flate2::read::GzDecoder::new(file)) } else { Box::new(file) };
            let mut seen = std::collections::BTreeMap::new();
            for e in tar::Archive::new(reader).entries()? {
                let mut e = e?;
                let name = e.path()?.to_string_lossy().into_owned();
                let mode = e.header().mode()?;
                let mut b = Vec::new();
                e.read_to_end(&mut b)?;
                seen.insert(name, (mode, b));
            }
            let top = v["top"].as_str().unwrap_or_default().to_string();
            let names: Vec<&str> = seen.keys().map(|k| k.strip_prefix(&format!("{top}/")).unwrap_or(k)).collect();
            assert_eq!(
                names,
                [
                    "SHA256SUMS",
                    "bin/hangar",
                    "compose/docker-compose.yml",
                    "helm/hangar/Chart.yaml",
                    "helm/hangar/templates/a.yaml",
                    "install.sh"
                ]
            );
            assert_eq!(seen[&format!("{top}/bin/hangar")].0, 0o755);
            assert_eq!(seen[&format!("{top}/install.sh")].0, 0o755);
            let sums = String::from_utf8(seen[&format!("{top}/SHA256SUMS")].1.clone())?;
            assert_eq!(sums.lines().count(), 5, "{sums}");
            for line in sums.lines() {
                let (sum, name) = line.split_once("  ").unwrap_or_default();
                assert_eq!(sum, sha(&seen[&format!("{top}/{name}")].1), "{name}");
            }
            assert_eq!(v["sha256"], sha(&std::fs::read(dir.path().join(out))?));
        }
        Ok(())
    }

    #[test]
    fn a_missing_input_is_named() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let args = BundleArgs {
            out: dir.path().join("b.tar"),
            binary: Some(dir.path().join("nope")),
            image: None,
            chart: None,
            compose: None,
        };
        let e = format!("{:#}", run(args).err().unwrap_or_else(|| anyhow::anyhow!("no error")));
        assert!(e.contains("nope"), "{e}");
        assert!(!dir.path().join("b.tar").exists());
        let args = BundleArgs {
            out: dir.path().join("b.tar"),
            binary: None,
            image: None,
            chart: Some(dir.path().join("no-chart")),
            compose: None,
        };
        let e = format!("{:#}", run(args).err().unwrap_or_else(|| anyhow::anyhow!("no error")));
        assert!(e.contains("no-chart"), "{e}");
    }
}
