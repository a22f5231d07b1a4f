//! Password policy and argon2id hashing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use argon2::password_hash::phc::{Output, ParamsString, PasswordHash, Salt};
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tokio::sync::Semaphore;

use crate::error::{IdentityError, Result};

/// The password rules, with the reference service's key names and defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordPolicy {
    pub min_length: usize,
    pub max_length: usize,
    pub require_uppercase: bool,
    pub require_lowercase: bool,
    pub require_number: bool,
    pub require_special: bool,
}

impl Default for PasswordPolicy {
    fn default() -> Self {
        PasswordPolicy {
            min_length: 12,
            max_length: 128,
            require_uppercase: true,
            require_lowercase: true,
            require_number: true,
            require_special: true,
        }
    }
}

impl PasswordPolicy {
    /// Check a password; the error lists every rule it breaks.
    pub fn check(&self, password: &str) -> Result<()> {
        let mut broken = Vec::new();
        let len = password.chars().count();
        if len < self.min_length {
            broken.push(format!("at least {} characters", self.min_length));
        }
        if len > self.max_length {
            broken.push(format!("at most {} characters", self.max_length));
        }
        if self.require_uppercase && !password.chars().any(|c| c.is_uppercase()) {
            broken.push("an upper-case letter".to_string());
        }
        if self.require_lowercase && !password.chars().any(|c| c.is_lowercase()) {
            broken.push("a lower-case letter".to_string());
        }
        if self.require_number && !password.chars().any(|c| c.is_ascii_digit()) {
            broken.push("a digit".to_string());
        }
        if self.require_special && !password.chars().any(|c| !c.is_alphanumeric() && !c.is_whitespace()) {
            broken.push("a special character such as !@#$%^&*()_+.?".to_string());
        }
        if broken.is_empty() {
            Ok(())
        } else {
            Err(IdentityError::Policy(format!("the password needs {}", broken.join(", "))))
        }
    }
}

/// Hash with argon2id (OWASP parameters: 19 MiB, 2 passes, 1 lane). CPU-heavy: call it
/// from `spawn_blocking`.
pub fn hash(password: &str) -> Result<String> {
    let mut salt = [0u8; 16];
    aws_lc_rs::rand::fill(&mut salt).map_err(|_| IdentityError::Internal("no randomness".into()))?;
    Argon2::default()
        .hash_password_with_salt(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| IdentityError::Internal(format!("argon2: {e}")))
}

/// Verify against a PHC string. A malformed stored hash verifies as false.
pub fn verify(password: &str, phc: &str) -> bool {
    Argon2::default().verify_password(password.as_bytes(), phc).is_ok()
}

// ----- hashes imported from the Parallels DevOps Service ---------------------------------

/// Prefix of a secret hash imported from the reference service (`hangar db import-pds`):
/// `pds-bcrypt$<hex of the salt>$<bcrypt hash>`. The reference hashes `secret + salt` with
/// bcrypt, where the salt is the first 32 bytes of the user's (or API key's) id, and refuses
/// inputs longer than 40 bytes (`src/security/password/main.go`). Such a hash is verified at
/// login and replaced by Hangar's own hash on the first success.
pub const PDS_BCRYPT_PREFIX: &str = "pds-bcrypt$";

/// The highest bcrypt cost an imported hash may ask for (the reference uses 10); higher
/// costs are not computed, so a crafted record cannot make a login burn minutes of CPU.
const MAX_BCRYPT_COST: u32 = 14;

/// The stored form of a reference bcrypt hash made with `salt_source` (the record's id in
/// the reference; only its first 32 bytes were used).
pub fn pds_bcrypt_hash(salt_source: &str, bcrypt_hash: &str) -> String {
    let salt = &salt_source.as_bytes()[..salt_source.len().min(32)];
    format!("{PDS_BCRYPT_PREFIX}{}${bcrypt_hash}", hex::encode(salt))
}

/// Whether a stored hash was imported from the reference and waits for its first use.
pub fn is_pds_hash(stored: &str) -> bool {
    stored.starts_with(PDS_BCRYPT_PREFIX)
}

/// Check `secret` against an imported reference hash; `None` when `stored` is not one (or
/// is malformed, or asks for too high a cost).
pub fn verify_pds(secret: &str, stored: &str) -> Option<bool> {
    let rest = stored.strip_prefix(PDS_BCRYPT_PREFIX)?;
    let (salt_hex, hash) = rest.split_once('$')?;
    let salt = hex::decode(salt_hex).ok()?;
    let cost: u32 = hash.split('$').nth(2)?.parse().ok()?;
    if cost > MAX_BCRYPT_COST {
        return None;
    }
    if secret.len() > 40 {
        // The reference refuses these, so no stored hash can match one.
        return Some(false);
    }
    let mut input = secret.as_bytes().to_vec();
    input.extend_from_slice(&salt);
    bcrypt::verify(&input, hash).ok()
}

/// A random password that satisfies the default policy.
pub fn generate() -> Result<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let mut bytes = [0u8; 24];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| IdentityError::Internal("no randomness".into()))?;
    let mut s: String = bytes.iter().map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char).collect();
    // Guarantee each class regardless of the draw.
    s.push_str("Aa7!");
    Ok(s)
}

// ----- the bounded hashing pool ------------------------------------------------------------

/// At most this many password hashes run at once, whatever the number of cores: argon2id
/// takes 19 MiB per hash, so this bounds the memory that hashing can ever take.
const MAX_PERMITS: usize = 8;
/// Callers that may wait for a free hasher, per hasher, before new ones are refused.
const QUEUE_PER_PERMIT: usize = 16;
/// The longest a caller waits for a free hasher before it is refused.
const MAX_WAIT: Duration = Duration::from_secs(10);
/// Stored hashes asking for more memory than this (in KiB) are not computed.
const MAX_M_COST: u32 = 256 * 1024;

/// Password hashing with bounded concurrency and bounded memory.
///
/// A login flood must not take the server's memory: each argon2id computation needs its
/// memory cost (19 MiB by default) at once, so at most `permits` computations run together
/// (one per core, at most [`MAX_PERMITS`]); at most `QUEUE_PER_PERMIT` callers per permit
/// wait, for at most [`MAX_WAIT`], and the others get [`IdentityError::Busy`] (503 with
/// `Retry-After`). The argon2 working memory is kept and reused, one buffer per permit,
/// instead of being allocated and freed for every hash (the allocator would otherwise keep
/// the freed blocks in per-thread arenas and the process would grow with the number of
/// blocking threads that ever hashed).
pub struct HashPool {
    permits: Arc<Semaphore>,
    size: usize,
    queue_limit: usize,
    waiting: AtomicUsize,
    buffers: Arc<Mutex<Vec<Vec<Block>>>>,
    dummy: tokio::sync::OnceCell<String>,
}

impl std::fmt::Debug for HashPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HashPool").field("size", &self.size).field("queue_limit", &self.queue_limit).finish()
    }
}

impl Default for HashPool {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        HashPool::new(cores.clamp(1, MAX_PERMITS))
    }
}

struct Checkout<'a> {
    pool: &'a HashPool,
}

impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        self.pool.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

impl HashPool {
    /// A pool running at most `size` hashes at once.
    pub fn new(size: usize) -> Self {
        let size = size.max(1);
        HashPool {
            permits: Arc::new(Semaphore::new(size)),
            size,
            queue_limit: size * (QUEUE_PER_PERMIT + 1),
            waiting: AtomicUsize::new(0),
            buffers: Arc::new(Mutex::new(Vec::new())),
            dummy: tokio::sync::OnceCell::new(),
        }
    }

    /// How many hashes may run at once.
    pub fn size(&self) -> usize {
        self.size
    }

    /// How many password checks one source address may have running or waiting at once: a
    /// quarter of the queue (at least one per hasher), so a flood from one address leaves
    /// room for everyone else.
    pub fn per_source(&self) -> usize {
        (self.queue_limit / 4).max(self.size)
    }

    /// Run `f` on the blocking pool with a working buffer, once a permit is free.
    async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Vec<Block>) -> Result<T> + Send + 'static,
    {
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.queue_limit {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(IdentityError::Busy { seconds: 1 });
        }
        let _checkout = Checkout { pool: self };
        let permit = match tokio::time::timeout(MAX_WAIT, self.permits.clone().acquire_owned()).await {
            Ok(Ok(p)) => p,
            Ok(Err(_)) => return Err(IdentityError::Internal("the password hasher is closed".into())),
            Err(_) => return Err(IdentityError::Busy { seconds: 2 }),
        };
        // A buffer is taken after the permit and given back before it, so there are never
        // more buffers than permits and none is ever freed: a permit's next holder always
        // finds one (measured: giving it back after the permit let every hand-over allocate
        // a new 19 MiB buffer and free another, and glibc's per-thread arenas kept them,
        // 63 -> 294 MB over 900 bad logins).
        let buffers = self.buffers.clone();
        let size = self.size;
        tokio::task::spawn_blocking(move || {
            let mut buf = buffers.lock().map(|mut b| b.pop()).unwrap_or_default().unwrap_or_default();
            let out = f(&mut buf);
            if let Ok(mut b) = buffers.lock()
                && b.len() < size
            {
                b.push(buf);
            }
            drop(permit);
            out
        })
        .await
        .map_err(|e| IdentityError::Internal(format!("password hashing task: {e}")))?
    }

    /// Hash a new password (argon2id, default parameters, random salt).
    pub async fn hash(&self, password: String) -> Result<String> {
        self.run(move |buf| hash_with(&password, buf)).await
    }

    /// Verify a password against a PHC string; a malformed hash verifies as false (after
    /// the same work as a real check).
    pub async fn verify(&self, password: String, phc: String) -> Result<bool> {
        if is_pds_hash(&phc) {
            // A hash imported from the reference (bcrypt): checked in the same bounded pool.
            return self.run(move |_| Ok(verify_pds(&password, &phc).unwrap_or(false))).await;
        }
        let dummy = self.dummy().await?;
        self.run(move |buf| {
            Ok(verify_with(&password, &phc, buf).unwrap_or_else(|| {
                let _ = verify_with(&password, &dummy, buf);
                false
            }))
        })
        .await
    }

    /// Spend the time and memory of a real check, for a user that does not exist.
    pub async fn verify_dummy(&self, password: String) -> Result<()> {
        let dummy = self.dummy().await?;
        self.run(move |buf| {
            let _ = verify_with(&password, &dummy, buf);
            Ok(())
        })
        .await
    }

    /// A hash of a random password with the current parameters, made once.
    async fn dummy(&self) -> Result<String> {
        self.dummy
            .get_or_try_init(|| async {
                let pw = URL_SAFE_NO_PAD.encode(random_bytes::<24>()?);
                self.run(move |buf| hash_with(&pw, buf)).await
            })
            .await
            .cloned()
    }
}

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| IdentityError::Internal("no randomness".into()))?;
    Ok(b)
}

fn blocks(buf: &mut Vec<Block>, n: usize) -> &mut [Block] {
    if buf.len() < n {
        buf.resize(n, Block::new());
    }
    &mut buf[..n]
}

/// argon2id with the default parameters into `buf`, as a PHC string.
fn hash_with(password: &str, buf: &mut Vec<Block>) -> Result<String> {
    let salt = random_bytes::<16>()?;
    let params = Params::default();
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
    let internal = |e: &dyn std::fmt::Display| IdentityError::Internal(format!("argon2: {e}"));
    argon
        .hash_password_into_with_memory(password.as_bytes(), &salt, &mut out, blocks(buf, params.block_count()))
        .map_err(|e| internal(&e))?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).map_err(|e| internal(&e))?,
        salt: Some(Salt::new(&salt).map_err(|e| internal(&e))?),
        hash: Some(Output::new(&out).map_err(|e| internal(&e))?),
    };
    Ok(phc.to_string())
}

/// Verify into `buf`; `None` when the PHC string cannot be checked.
fn verify_with(password: &str, phc: &str, buf: &mut Vec<Block>) -> Option<bool> {
    let parsed = PasswordHash::new(phc).ok()?;
    let algorithm = Algorithm::try_from(parsed.algorithm.as_str()).ok()?;
    let version = parsed.version.map(Version::try_from).transpose().ok()?.unwrap_or_default();
    let params = Params::try_from(&parsed).ok()?;
    if params.m_cost() > MAX_M_COST {
        return None;
    }
    let salt = parsed.salt?;
    let expected = parsed.hash?;
    let mut out = vec![0u8; expected.len()];
    let n = params.block_count();
    Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password.as_bytes(), salt.as_ref(), &mut out, blocks(buf, n))
        .ok()?;
    Some(aws_lc_rs::constant_time::verify_slices_are_equal(&out, expected.as_bytes()).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_bcrypt_hashes_verify_with_the_id_as_salt() {
        let id = "0123456789abcdef0123456789abcdef-and-more";
        // As the reference: bcrypt over password + the first 32 bytes of the id, `$2a$`.
        let go = bcrypt::hash_with_result(b"Secret-1!0123456789abcdef0123456789abcdef", 4)
            .unwrap()
            .format_for_version(bcrypt::Version::TwoA);
        let stored = pds_bcrypt_hash(id, &go);
        assert!(is_pds_hash(&stored));
        assert_eq!(verify_pds("Secret-1!", &stored), Some(true));
        assert_eq!(verify_pds("Secret-2!", &stored), Some(false));
        assert_eq!(verify_pds(&"x".repeat(41), &stored), Some(false));
        assert_eq!(verify_pds("Secret-1!", "pds-bcrypt$zz$nothash"), None);
        let costly = pds_bcrypt_hash(id, "$2a$31$abcdefghijklmnopqrstuuabcdefghijklmnopqrstuvwxyz01234");
        assert_eq!(verify_pds("Secret-1!", &costly), None, "a cost above the limit is not computed");
        assert_eq!(verify_pds("Secret-1!", "$argon2id$v=19$m=19456,t=2,p=1$x$y"), None);
    }

    #[test]
    fn policy_names_every_broken_rule() {
        let p = PasswordPolicy::default();
        let e = p.check("short").unwrap_err().to_string();
        assert!(e.contains("at least 12"), "{e}");
        assert!(e.contains("upper-case"), "{e}");
        assert!(e.contains("digit"), "{e}");
        assert!(p.check("Correct-Horse-9-battery").is_ok());
    }

    #[test]
    fn hash_verifies_only_the_right_password() {
        let h = hash("Correct-Horse-9").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify("Correct-Horse-9", &h));
        assert!(!verify("Correct-Horse-8", &h));
        assert!(!verify("x", "not a phc string"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_pool_hashes_verifies_and_refuses_beyond_its_queue() {
        let pool = Arc::new(HashPool::new(1));
        let h = pool.hash("Correct-Horse-9".into()).await.unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify("Correct-Horse-9", &h), "the library reads the pool's hashes");
        assert!(pool.verify("Correct-Horse-9".into(), h.clone()).await.unwrap());
        assert!(!pool.verify("Correct-Horse-8".into(), h.clone()).await.unwrap());
        assert!(!pool.verify("x".into(), "not a phc string".into()).await.unwrap());
        let lib = hash("Correct-Horse-9").unwrap();
        assert!(pool.verify("Correct-Horse-9".into(), lib).await.unwrap(), "the pool reads the library's hashes");
        // 1 running + 16 waiting at most: of 40 at once, some are refused as busy.
        let tries: Vec<_> = (0..40)
            .map(|_| {
                let p = pool.clone();
                tokio::spawn(async move { p.verify_dummy("x".into()).await })
            })
            .collect();
        let mut busy = 0;
        for t in tries {
            if let Err(IdentityError::Busy { .. }) = t.await.unwrap() {
                busy += 1;
            }
        }
        assert!(busy >= 40 - 17, "{busy} refused");
        assert!(pool.buffers.lock().unwrap().len() <= 1, "one working buffer per permit");
    }

    #[test]
    fn generated_passwords_pass_the_default_policy() {
        let p = PasswordPolicy::default();
        for _ in 0..20 {
            p.check(&generate().unwrap()).unwrap();
        }
    }
}
