//! Generated VM-like image folders for tests and benchmarks: a big sparse
//! disk file made of random, compressible and all-zero regions, small config
//! and NVRAM files, an empty folder, an empty file and a symlink.
//! Deterministic for a given seed.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Path of the disk file inside a generated image.
pub const DISK: &str = "disk.hdd/disk.hdd.0.hds";

/// A small deterministic generator (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// A value in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

const WORDS: &[&str] = &[
    "kernel",
    "module",
    "lib",
    "usr",
    "share",
    "locale",
    "config",
    "system",
    "daemon",
    "service",
    "network",
    "interface",
    "address",
    "bridge",
    "volume",
    "snapshot",
    "guest",
    "agent",
    "qemu",
    "parallels",
    "virtual",
    "machine",
    "device",
    "driver",
    "firmware",
    "boot",
    "loader",
    "entry",
];

/// Text-like bytes that compress about 3-4x.
fn compressible(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    while out.len() < len {
        let w = WORDS[rng.below(WORDS.len() as u64) as usize];
        out.extend_from_slice(w.as_bytes());
        out.push(if rng.below(8) == 0 { b'\n' } else { b' ' });
        if rng.below(16) == 0 {
            out.extend_from_slice(format!("{:x}", rng.next_u64()).as_bytes());
        }
    }
    out.truncate(len);
    out
}

/// Writes a disk of `disk_size` bytes at `path`: regions of 1-8 MiB, about
/// 40% random, 30% compressible, 30% zeros (left as holes).
/// Returns the number of zero bytes.
pub fn write_disk(path: &Path, disk_size: u64, seed: u64) -> io::Result<u64> {
    let mut rng = Rng::new(seed);
    let mut f = fs::File::create(path)?;
    f.set_len(disk_size)?;
    let mut at = 0u64;
    let mut zeros = 0u64;
    while at < disk_size {
        let len = ((1 + rng.below(8)) << 20).min(disk_size - at);
        let kind = rng.below(10);
        if kind < 3 {
            zeros += len;
        } else {
            let n = usize::try_from(len).map_err(io::Error::other)?;
            let buf = if kind < 7 {
                let mut b = vec![0u8; n];
                rng.fill(&mut b);
                b
            } else {
                compressible(&mut rng, n)
            };
            f.seek(SeekFrom::Start(at))?;
            f.write_all(&buf)?;
        }
        at += len;
    }
    f.sync_all()?;
    Ok(zeros)
}

/// Creates a VM-like image folder at `dir` (which must not exist) with a
/// disk of `disk_size` bytes. Returns the disk's number of zero bytes.
pub fn generate(dir: &Path, disk_size: u64, seed: u64) -> io::Result<u64> {
    fs::create_dir(dir)?;
    let mut rng = Rng::new(seed ^ 0xABCD);
    fs::write(dir.join("config.pvs"), compressible(&mut rng, 6000))?;
    let mut nvram = vec![0u8; 256 * 1024];
    rng.fill(&mut nvram);
    fs::write(dir.join("NVRAM.dat"), nvram)?;
    fs::set_permissions(dir.join("NVRAM.dat"), fs::Permissions::from_mode(0o600))?;
    fs::create_dir(dir.join("disk.hdd"))?;
    fs::write(dir.join("disk.hdd/DiskDescriptor.xml"), compressible(&mut rng, 1500))?;
    let zeros = write_disk(&dir.join(DISK), disk_size, seed)?;
    fs::create_dir(dir.join("Snapshots"))?;
    fs::set_permissions(dir.join("Snapshots"), fs::Permissions::from_mode(0o750))?;
    fs::write(dir.join("empty.log"), b"")?;
    std::os::unix::fs::symlink("config.pvs", dir.join("config.link"))?;
    Ok(zeros)
}

/// Overwrites `fraction` of the disk file with new random bytes, in `runs`
/// contiguous extents at random places (like a guest writing a few files).
/// Returns the number of bytes changed.
pub fn mutate_disk(dir: &Path, fraction: f64, runs: u64, seed: u64) -> io::Result<u64> {
    let path = dir.join(DISK);
    let size = fs::metadata(&path)?.len();
    let mut rng = Rng::new(seed);
    let per_run = ((size as f64 * fraction) as u64 / runs.max(1)) & !4095;
    let mut f = fs::File::options().write(true).open(&path)?;
    let mut changed = 0u64;
    for _ in 0..runs {
        let at = rng.below(size.saturating_sub(per_run) / 4096) * 4096;
        let mut buf = vec![0u8; usize::try_from(per_run).map_err(io::Error::other)?];
        rng.fill(&mut buf);
        f.seek(SeekFrom::Start(at))?;
        f.write_all(&buf)?;
        changed += per_run;
    }
    f.sync_all()?;
    Ok(changed)
}

/// What a folder holds, for comparisons: path → description (kind, mode,
/// size and blake3 of files; target of links).
pub fn fingerprint(dir: &Path) -> io::Result<BTreeMap<String, String>> {
    fn visit(root: &Path, d: &Path, out: &mut BTreeMap<String, String>) -> io::Result<()> {
        for e in fs::read_dir(d)? {
            let e = e?;
            let p = e.path();
            let rel = p.strip_prefix(root).map_err(io::Error::other)?.to_string_lossy().into_owned();
            let m = fs::symlink_metadata(&p)?;
            let mode = m.permissions().mode() & 0o7777;
            if m.file_type().is_symlink() {
                out.insert(rel, format!("link -> {}", fs::read_link(&p)?.display()));
            } else if m.is_dir() {
                out.insert(rel, format!("dir {mode:o}"));
                visit(root, &p, out)?;
            } else {
                let mut h = blake3::Hasher::new();
                let mut f = fs::File::open(&p)?;
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
                out.insert(rel, format!("file {mode:o} {} {}", m.len(), h.finalize().to_hex()));
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    visit(dir, dir, &mut out)?;
    Ok(out)
}

/// Creates the dedup benchmark's bundle at `dir` (which must not exist): a
/// disk of `size` bytes whose first `random` bytes are random and the rest
/// zeros, plus a small config file.
pub fn generate_random_then_zeros(dir: &Path, size: u64, random: u64, seed: u64) -> io::Result<()> {
    fs::create_dir(dir)?;
    let mut rng = Rng::new(seed);
    fs::write(dir.join("config.pvs"), compressible(&mut rng, 6000))?;
    if let Some(parent) = dir.join(DISK).parent() {
        fs::create_dir_all(parent)?;
    }
    let mut f = fs::File::create(dir.join(DISK))?;
    f.set_len(size)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < random.min(size) {
        let n = usize::try_from((random.min(size) - at).min(buf.len() as u64)).map_err(io::Error::other)?;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        at += n as u64;
    }
    f.sync_all()
}

/// How [`mutate_pattern`] changes a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangePattern {
    /// Whole aligned blocks of this many bytes (e.g. 1 MiB).
    Clustered(u64),
    /// Runs of `min..=max` bytes (multiples of 4 KiB) at 4 KiB-aligned places
    /// scattered over the region, like a guest file system's writes.
    Scattered {
        /// Shortest run.
        min: u64,
        /// Longest run.
        max: u64,
    },
}

/// Overwrites at least `total` bytes of the disk file's byte range `region`
/// with new random bytes in the given pattern, never the same 4 KiB page
/// twice. Returns the number of bytes changed.
pub fn mutate_pattern(
    dir: &Path,
    region: std::ops::Range<u64>,
    total: u64,
    pattern: ChangePattern,
    seed: u64,
) -> io::Result<u64> {
    const PAGE: u64 = 4096;
    let path = dir.join(DISK);
    let mut f = fs::File::options().write(true).open(&path)?;
    let mut rng = Rng::new(seed);
    let start = region.start.div_ceil(PAGE) * PAGE;
    let pages = (region.end.saturating_sub(start)) / PAGE;
    let mut used = vec![false; usize::try_from(pages).map_err(io::Error::other)?];
    let mut changed = 0u64;
    let mut attempts = 0u64;
    while changed < total {
        attempts += 1;
        if attempts > 1_000_000 {
            return Err(io::Error::other("region too small for the change asked"));
        }
        let (len_pages, at_page) = match pattern {
            ChangePattern::Clustered(block) => {
                let bp = (block / PAGE).max(1);
                let blocks = pages / bp;
                if blocks == 0 {
                    return Err(io::Error::other("region smaller than one block"));
                }
                (bp, rng.below(blocks) * bp)
            }
            ChangePattern::Scattered { min, max } => {
                let (lo, hi) = ((min / PAGE).max(1), (max / PAGE).max(1));
                let lp = lo + rng.below(hi.saturating_sub(lo) + 1);
                if lp > pages {
                    return Err(io::Error::other("region smaller than one run"));
                }
                (lp, rng.below(pages - lp + 1))
            }
        };
        let (a, b) = (at_page as usize, (at_page + len_pages) as usize);
        if used[a..b].iter().any(|u| *u) {
            continue;
        }
        used[a..b].iter_mut().for_each(|u| *u = true);
        let len = len_pages * PAGE;
        let mut buf = vec![0u8; usize::try_from(len).map_err(io::Error::other)?];
        rng.fill(&mut buf);
        f.seek(SeekFrom::Start(start + at_page * PAGE))?;
        f.write_all(&buf)?;
        changed += len;
    }
    f.sync_all()?;
    Ok(changed)
}
