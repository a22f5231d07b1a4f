//! The write-ahead journal's binary layout: the file header, frames, and the scanner that
//! finds the last good frame. The layout is documented in the parent module.

use std::ops::Range;

use super::crypto::{Cipher, SEAL_OVERHEAD};

/// Magic bytes at the start of `journal.log`.
pub(crate) const HEADER_MAGIC: &[u8; 8] = b"HNGRJNL1";
/// Journal format version.
pub(crate) const JOURNAL_VERSION: u32 = 1;
/// Header flag: frames are encrypted.
pub(crate) const FLAG_ENCRYPTED: u32 = 1;
/// Size of the key-check field in the header.
const KEYCHECK_LEN: usize = 16 + SEAL_OVERHEAD;
/// Total header size.
pub(crate) const HEADER_LEN: usize = 8 + 4 + 4 + 16 + KEYCHECK_LEN + 16;
/// Magic bytes at the start of every frame. `0xF7` never occurs in UTF-8, so a JSON payload
/// can never contain it.
pub(crate) const FRAME_MAGIC: [u8; 4] = [0xF7, b'H', b'F', 0x01];
/// Frame header size: magic, length, revision, checksum.
pub(crate) const FRAME_HEADER_LEN: usize = 4 + 4 + 8 + 16;
/// Largest frame payload accepted (a bigger batch is refused with `Invalid`).
pub(crate) const MAX_FRAME_PAYLOAD: usize = 512 * 1024 * 1024;

const KEYCHECK_AAD: &[u8] = b"hangar-journal-keycheck-v1";
const FRAME_AAD_TAG: &[u8] = b"hangar-journal-frame-v1";

/// A decoded journal header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) encrypted: bool,
    pub(crate) journal_id: [u8; 16],
}

/// Why a header could not be used.
#[derive(Debug)]
pub(crate) enum HeaderError {
    /// Damaged: short, bad magic, bad checksum or unknown version.
    Damaged(String),
    /// The key check failed: wrong key.
    WrongKey,
    /// The header says encrypted but no key was given (or the opposite).
    EncryptionMismatch { encrypted: bool },
}

fn checksum16(parts: &[&[u8]]) -> [u8; 16] {
    let mut hasher = blake3::Hasher::new();
    for part in parts {
        hasher.update(part);
    }
    let hash = hasher.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&hash.as_bytes()[..16]);
    out
}

fn keycheck_aad(journal_id: &[u8; 16]) -> Vec<u8> {
    let mut aad = KEYCHECK_AAD.to_vec();
    aad.extend_from_slice(journal_id);
    aad
}

/// Encodes a header for a new journal.
pub(crate) fn encode_header(journal_id: [u8; 16], cipher: Option<&Cipher>) -> crate::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(HEADER_MAGIC);
    out.extend_from_slice(&JOURNAL_VERSION.to_le_bytes());
    let flags = if cipher.is_some() { FLAG_ENCRYPTED } else { 0 };
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&journal_id);
    match cipher {
        Some(cipher) => {
            let sealed = cipher.seal(&keycheck_aad(&journal_id), &[0u8; 16])?;
            out.extend_from_slice(&sealed);
        }
        None => out.extend_from_slice(&[0u8; KEYCHECK_LEN]),
    }
    let sum = checksum16(&[&out]);
    out.extend_from_slice(&sum);
    debug_assert_eq!(out.len(), HEADER_LEN);
    Ok(out)
}

/// Decodes and checks a header against the configured key.
pub(crate) fn decode_header(buf: &[u8], cipher: Option<&Cipher>) -> Result<Header, HeaderError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Err(HeaderError::Damaged(format!("journal header is {} bytes, expected {HEADER_LEN}", buf.len())));
    };
    let (body, sum) = header.split_at(HEADER_LEN - 16);
    if &body[..8] != HEADER_MAGIC {
        return Err(HeaderError::Damaged("not a Hangar journal (bad magic)".into()));
    }
    if checksum16(&[body]) != sum {
        return Err(HeaderError::Damaged("journal header checksum mismatch".into()));
    }
    let version = u32::from_le_bytes([body[8], body[9], body[10], body[11]]);
    if version != JOURNAL_VERSION {
        return Err(HeaderError::Damaged(format!("unsupported journal version {version}")));
    }
    let flags = u32::from_le_bytes([body[12], body[13], body[14], body[15]]);
    let encrypted = flags & FLAG_ENCRYPTED != 0;
    let mut journal_id = [0u8; 16];
    journal_id.copy_from_slice(&body[16..32]);
    let keycheck = &body[32..32 + KEYCHECK_LEN];
    match (encrypted, cipher) {
        (true, Some(cipher)) => {
            if cipher.open(&keycheck_aad(&journal_id), keycheck).is_none() {
                return Err(HeaderError::WrongKey);
            }
        }
        (false, None) => {}
        (encrypted, _) => return Err(HeaderError::EncryptionMismatch { encrypted }),
    }
    Ok(Header { encrypted, journal_id })
}

fn frame_aad(journal_id: &[u8; 16], revision: u64) -> Vec<u8> {
    let mut aad = Vec::with_capacity(FRAME_AAD_TAG.len() + 24);
    aad.extend_from_slice(FRAME_AAD_TAG);
    aad.extend_from_slice(journal_id);
    aad.extend_from_slice(&revision.to_le_bytes());
    aad
}

/// Appends one frame holding `plain` (the JSON of a batch's ops) to `out`, encrypting it if
/// a cipher is given. Returns the frame's size, or `None` when the payload is too large.
pub(crate) fn encode_frame(
    out: &mut Vec<u8>,
    journal_id: &[u8; 16],
    revision: u64,
    plain: &[u8],
    cipher: Option<&Cipher>,
) -> crate::Result<Option<usize>> {
    let sealed;
    let payload = match cipher {
        Some(cipher) => {
            sealed = cipher.seal(&frame_aad(journal_id, revision), plain)?;
            sealed.as_slice()
        }
        None => plain,
    };
    if payload.len() > MAX_FRAME_PAYLOAD {
        return Ok(None);
    }
    let len = (payload.len() as u32).to_le_bytes();
    let rev = revision.to_le_bytes();
    let sum = checksum16(&[journal_id, &len, &rev, payload]);
    out.extend_from_slice(&FRAME_MAGIC);
    out.extend_from_slice(&len);
    out.extend_from_slice(&rev);
    out.extend_from_slice(&sum);
    out.extend_from_slice(payload);
    Ok(Some(FRAME_HEADER_LEN + payload.len()))
}

/// A frame whose checksum holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    pub(crate) revision: u64,
    pub(crate) payload: Range<usize>,
    /// Offset just past the frame.
    pub(crate) end: usize,
}

/// Parses the frame starting at `offset`, or says why there is no good frame there.
pub(crate) fn parse_frame_at(buf: &[u8], offset: usize, journal_id: &[u8; 16]) -> Result<Frame, &'static str> {
    let Some(rest) = buf.get(offset..) else {
        return Err("offset past the end");
    };
    let Some(head) = rest.get(..FRAME_HEADER_LEN) else {
        return Err("short frame header");
    };
    if head[..4] != FRAME_MAGIC {
        return Err("bad frame magic");
    }
    let len_bytes = [head[4], head[5], head[6], head[7]];
    let len = u32::from_le_bytes(len_bytes) as usize;
    if len > MAX_FRAME_PAYLOAD {
        return Err("frame length out of range");
    }
    let Some(payload) = rest.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len) else {
        return Err("short frame payload");
    };
    let rev_bytes: [u8; 8] = [head[8], head[9], head[10], head[11], head[12], head[13], head[14], head[15]];
    if checksum16(&[journal_id, &len_bytes, &rev_bytes, payload]) != head[16..32] {
        return Err("frame checksum mismatch");
    }
    let start = offset + FRAME_HEADER_LEN;
    Ok(Frame { revision: u64::from_le_bytes(rev_bytes), payload: start..start + len, end: start + len })
}

/// Offset of the first good frame that starts after `from`, if any. Used to tell a torn
/// tail (nothing good follows) from damage in the middle of the journal.
pub(crate) fn next_good_frame(buf: &[u8], from: usize, journal_id: &[u8; 16]) -> Option<usize> {
    let mut pos = from;
    while pos + FRAME_HEADER_LEN <= buf.len() {
        let window = &buf[pos..];
        let found = window.iter().position(|&b| b == FRAME_MAGIC[0])?;
        pos += found;
        if parse_frame_at(buf, pos, journal_id).is_ok() {
            return Some(pos);
        }
        pos += 1;
    }
    None
}

/// Decrypts (or borrows) a frame payload.
pub(crate) fn open_payload(
    buf: &[u8],
    frame: &Frame,
    journal_id: &[u8; 16],
    cipher: Option<&Cipher>,
) -> Option<Vec<u8>> {
    let payload = &buf[frame.payload.clone()];
    match cipher {
        Some(cipher) => cipher.open(&frame_aad(journal_id, frame.revision), payload),
        None => Some(payload.to_vec()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::json::crypto::EncryptionKey;

    #[test]
    fn frames_round_trip_and_damage_is_found() {
        let id = [7u8; 16];
        let mut buf = encode_header(id, None).unwrap();
        assert_eq!(decode_header(&buf, None).unwrap(), Header { encrypted: false, journal_id: id });
        let first = buf.len();
        encode_frame(&mut buf, &id, 1, b"[1]", None).unwrap().unwrap();
        let second = buf.len();
        encode_frame(&mut buf, &id, 2, b"[2]", None).unwrap().unwrap();
        let f1 = parse_frame_at(&buf, first, &id).unwrap();
        assert_eq!((f1.revision, f1.end), (1, second));
        assert_eq!(&buf[f1.payload.clone()], b"[1]");
        // A frame from another journal id does not verify.
        assert!(parse_frame_at(&buf, first, &[8u8; 16]).is_err());
        let mut damaged = buf.clone();
        damaged[first + FRAME_HEADER_LEN] ^= 0x20;
        assert_eq!(parse_frame_at(&damaged, first, &id), Err("frame checksum mismatch"));
        assert_eq!(next_good_frame(&damaged, first + 1, &id), Some(second));
        assert_eq!(next_good_frame(&damaged, second + 1, &id), None);
    }

    #[test]
    fn encrypted_header_checks_the_key() {
        let key = Cipher::new(&EncryptionKey::generate().unwrap()).unwrap();
        let other = Cipher::new(&EncryptionKey::generate().unwrap()).unwrap();
        let id = [1u8; 16];
        let header = encode_header(id, Some(&key)).unwrap();
        assert!(decode_header(&header, Some(&key)).unwrap().encrypted);
        assert!(matches!(decode_header(&header, Some(&other)), Err(HeaderError::WrongKey)));
        assert!(matches!(decode_header(&header, None), Err(HeaderError::EncryptionMismatch { encrypted: true })));
        let mut buf = header;
        let at = buf.len();
        encode_frame(&mut buf, &id, 9, b"secret ops", Some(&key)).unwrap().unwrap();
        let frame = parse_frame_at(&buf, at, &id).unwrap();
        assert!(!buf.windows(10).any(|w| w == b"secret ops"));
        assert_eq!(open_payload(&buf, &frame, &id, Some(&key)).unwrap(), b"secret ops");
        assert!(open_payload(&buf, &frame, &id, Some(&other)).is_none());
    }
}
