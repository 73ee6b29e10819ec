//! Membership: everything the registration key protects.
//!
//! The key itself never leaves the node, neither in clear nor as a hash. Three independent
//! keys are derived from it with HKDF-SHA256 (salt `pg_peersync/1`, one label each):
//!
//! - `announce`: HMAC-SHA256 tag on multicast announcements;
//! - `request`: HMAC-SHA256 tag on every HTTP request and response, over method, path,
//!   timestamp, nonce and the body's SHA-256;
//! - `payload`: XChaCha20-Poly1305 key for bodies (compressed with zstd first).
//!
//! A receiver checks the tag first (a wrong key is rejected before anything else is looked
//! at), then the timestamp (stale), then the nonce (replay). `PROTOCOL.md` specifies the bytes.

use chacha20poly1305::aead::rand_core::RngCore;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Read;
use uuid::Uuid;

/// The version of the networking protocol (announcements, HTTP messages).
pub const PROTOCOL_VERSION: u32 = 1;
const SALT: &[u8] = b"pg_peersync/1";
/// Shortest registration key accepted.
pub const MIN_KEY_LEN: usize = 16;
/// Keys that documentation or examples show; a node configured with one stays offline.
const WELL_KNOWN: [&str; 4] = ["changeme", "change-me", "secret", "pg_peersync"];
/// Largest body accepted after decompression.
pub const MAX_BODY: u64 = 256 << 20;

type HmacSha256 = Hmac<Sha256>;

/// Why the registration key cannot be used (networking stays off).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("peersync.registration_key is not set")]
    Missing,
    #[error("peersync.registration_key is shorter than {MIN_KEY_LEN} characters")]
    TooShort,
    #[error("peersync.registration_key is a well-known example value")]
    WellKnown,
}

/// Why a message was rejected; `as_str` names the counter in `sync_status()`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("malformed message")]
    Malformed,
    #[error("wrong key (authentication tag does not match)")]
    WrongKey,
    #[error("stale timestamp (clock skew or delayed message)")]
    Stale,
    #[error("replayed nonce")]
    Replay,
    #[error("protocol version {0} (this node speaks {PROTOCOL_VERSION})")]
    Version(u32),
}

impl Rejection {
    pub fn as_str(&self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::WrongKey => "wrong_key",
            Rejection::Stale => "stale",
            Rejection::Replay => "replay",
            Rejection::Version(_) => "version",
        }
    }
}

/// The keys derived from the registration key. Never printed.
#[derive(Clone)]
pub struct Keys {
    announce: [u8; 32],
    request: [u8; 32],
    payload: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(<redacted>)")
    }
}

pub fn check_registration_key(key: &str) -> Result<(), KeyError> {
    let key = key.trim();
    if key.is_empty() {
        Err(KeyError::Missing)
    } else if WELL_KNOWN.iter().any(|w| key.eq_ignore_ascii_case(w)) {
        Err(KeyError::WellKnown)
    } else if key.chars().count() < MIN_KEY_LEN {
        Err(KeyError::TooShort)
    } else {
        Ok(())
    }
}

impl Keys {
    pub fn derive(registration_key: &str) -> Result<Keys, KeyError> {
        check_registration_key(registration_key)?;
        let hk = Hkdf::<Sha256>::new(Some(SALT), registration_key.trim().as_bytes());
        let expand = |label: &[u8]| {
            let mut out = [0u8; 32];
            hk.expand(label, &mut out).expect("32 bytes is a valid HKDF-SHA256 length");
            out
        };
        Ok(Keys { announce: expand(b"announce"), request: expand(b"request"), payload: expand(b"payload") })
    }

    fn tag(key: &[u8; 32], parts: &[&[u8]]) -> HmacSha256 {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes any key length");
        for p in parts {
            // Length-prefixed, so that no two different part lists give the same input.
            mac.update(&(p.len() as u64).to_be_bytes());
            mac.update(p);
        }
        mac
    }
}

pub fn new_nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    OsRng.fill_bytes(&mut n);
    n
}

pub fn hex(bytes: &[u8]) -> String {
    // Every event's checksum goes through here: no formatting machinery per byte.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Remembers recent nonces to reject replays; timestamps outside `window_ms` of now are stale.
#[derive(Debug)]
pub struct ReplayGuard {
    window_ms: u64,
    seen: HashMap<Vec<u8>, u64>,
}

impl ReplayGuard {
    pub fn new(window_ms: u64) -> ReplayGuard {
        ReplayGuard { window_ms, seen: HashMap::new() }
    }

    /// Accept `(ts_ms, nonce)` once, if fresh.
    pub fn check(&mut self, ts_ms: u64, nonce: &[u8], now_ms: u64) -> Result<(), Rejection> {
        if ts_ms.abs_diff(now_ms) > self.window_ms {
            return Err(Rejection::Stale);
        }
        // Older entries can no longer be replayed (they would be stale): forget them.
        let horizon = now_ms.saturating_sub(2 * self.window_ms);
        self.seen.retain(|_, ts| *ts >= horizon);
        if self.seen.insert(nonce.to_vec(), ts_ms).is_some() {
            return Err(Rejection::Replay);
        }
        Ok(())
    }
}

/// What a node announces by multicast.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Announcement {
    pub protocol: u32,
    pub node_id: Uuid,
    pub name: String,
    pub addresses: Vec<String>,
    pub port: u16,
    /// Digest of the tracked tables' definitions, so peers can tell a schema mismatch.
    pub schema: String,
    pub ts_ms: u64,
    /// 16 random bytes, hex.
    pub nonce: String,
}

#[derive(Serialize, Deserialize)]
struct SignedAnnouncement {
    announcement: Announcement,
    tag: String,
}

impl Announcement {
    /// The datagram: `{"announcement": {...}, "tag": "<hex HMAC>"}`, the tag over the
    /// announcement's JSON text exactly as sent.
    pub fn sign(&self, keys: &Keys) -> Vec<u8> {
        let text = serde_json::to_string(self).expect("serialises");
        let tag = Keys::tag(&keys.announce, &[b"announce", text.as_bytes()]).finalize().into_bytes();
        format!("{{\"announcement\":{text},\"tag\":\"{}\"}}", hex(&tag)).into_bytes()
    }

    pub fn verify(
        datagram: &[u8],
        keys: &Keys,
        now_ms: u64,
        guard: &mut ReplayGuard,
    ) -> Result<Announcement, Rejection> {
        let text = std::str::from_utf8(datagram).map_err(|_| Rejection::Malformed)?;
        // The tag covers the announcement's bytes as sent: take them from the datagram.
        let body = text
            .strip_prefix("{\"announcement\":")
            .and_then(|rest| rest.rfind(",\"tag\":\"").map(|i| &rest[..i]))
            .ok_or(Rejection::Malformed)?;
        let signed: SignedAnnouncement = serde_json::from_str(text).map_err(|_| Rejection::Malformed)?;
        let tag = unhex(&signed.tag).ok_or(Rejection::Malformed)?;
        Keys::tag(&keys.announce, &[b"announce", body.as_bytes()])
            .verify_slice(&tag)
            .map_err(|_| Rejection::WrongKey)?;
        let a = signed.announcement;
        if a.protocol != PROTOCOL_VERSION {
            return Err(Rejection::Version(a.protocol));
        }
        guard.check(a.ts_ms, a.nonce.as_bytes(), now_ms)?;
        Ok(a)
    }
}

/// The authentication of one HTTP request or response (sent as headers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    pub ts_ms: u64,
    pub nonce: [u8; 16],
    pub tag: Vec<u8>,
}

fn request_mac(keys: &Keys, method: &str, path: &str, ts_ms: u64, nonce: &[u8], body: &[u8]) -> HmacSha256 {
    let digest = Sha256::digest(body);
    Keys::tag(&keys.request, &[b"request", method.as_bytes(), path.as_bytes(), &ts_ms.to_be_bytes(), nonce, &digest])
}

impl Signature {
    /// Sign a message (`method` is `"RESPONSE"` for responses, `path` the request's).
    pub fn sign(keys: &Keys, method: &str, path: &str, body: &[u8], ts_ms: u64) -> Signature {
        Signature::sign_with(keys, method, path, body, ts_ms, new_nonce())
    }

    /// Sign with a given (fresh, random) nonce.
    pub fn sign_with(keys: &Keys, method: &str, path: &str, body: &[u8], ts_ms: u64, nonce: [u8; 16]) -> Signature {
        let tag = request_mac(keys, method, path, ts_ms, &nonce, body).finalize().into_bytes().to_vec();
        Signature { ts_ms, nonce, tag }
    }

    pub fn verify(
        &self,
        keys: &Keys,
        method: &str,
        path: &str,
        body: &[u8],
        now_ms: u64,
        guard: &mut ReplayGuard,
    ) -> Result<(), Rejection> {
        request_mac(keys, method, path, self.ts_ms, &self.nonce, body)
            .verify_slice(&self.tag)
            .map_err(|_| Rejection::WrongKey)?;
        guard.check(self.ts_ms, &self.nonce, now_ms)
    }

    /// As one header value: `<ts_ms>.<nonce hex>.<tag hex>`.
    pub fn header(&self) -> String {
        format!("{}.{}.{}", self.ts_ms, hex(&self.nonce), hex(&self.tag))
    }

    pub fn parse(header: &str) -> Result<Signature, Rejection> {
        let mut parts = header.split('.');
        let (Some(ts), Some(nonce), Some(tag), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(Rejection::Malformed);
        };
        let ts_ms = ts.parse().map_err(|_| Rejection::Malformed)?;
        let nonce: [u8; 16] = unhex(nonce).and_then(|n| n.try_into().ok()).ok_or(Rejection::Malformed)?;
        let tag = unhex(tag).filter(|t| t.len() == 32).ok_or(Rejection::Malformed)?;
        Ok(Signature { ts_ms, nonce, tag })
    }
}

/// Compress with zstd, then encrypt with XChaCha20-Poly1305: `nonce (24 bytes) || ciphertext`.
/// `aad` binds the body to its message (method, path, signature header).
pub fn seal(keys: &Keys, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let compressed = zstd::bulk::compress(plaintext, 3).expect("zstd compresses any input");
    let cipher = XChaCha20Poly1305::new((&keys.payload).into());
    let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
    let mut out = nonce.to_vec();
    out.extend(cipher.encrypt(&nonce, Payload { msg: &compressed, aad }).expect("encryption does not fail"));
    out
}

/// Undo `seal`; a wrong key or any changed byte is `WrongKey`.
pub fn open(keys: &Keys, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, Rejection> {
    if sealed.len() < 24 {
        return Err(Rejection::Malformed);
    }
    let (nonce, ciphertext) = sealed.split_at(24);
    let cipher = XChaCha20Poly1305::new((&keys.payload).into());
    let compressed =
        cipher.decrypt(XNonce::from_slice(nonce), Payload { msg: ciphertext, aad }).map_err(|_| Rejection::WrongKey)?;
    let mut out = Vec::new();
    zstd::stream::read::Decoder::new(compressed.as_slice())
        .map_err(|_| Rejection::Malformed)?
        .take(MAX_BODY + 1)
        .read_to_end(&mut out)
        .map_err(|_| Rejection::Malformed)?;
    if out.len() as u64 > MAX_BODY {
        return Err(Rejection::Malformed);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "correct horse battery staple";

    fn announcement(ts_ms: u64) -> Announcement {
        Announcement {
            protocol: PROTOCOL_VERSION,
            node_id: Uuid::from_u128(1),
            name: "shop-a".into(),
            addresses: vec!["10.0.0.1".into()],
            port: 8765,
            schema: "abc".into(),
            ts_ms,
            nonce: hex(&new_nonce()),
        }
    }

    #[test]
    fn weak_keys_are_refused() {
        assert_eq!(Keys::derive("").unwrap_err(), KeyError::Missing);
        assert_eq!(Keys::derive("  ").unwrap_err(), KeyError::Missing);
        assert_eq!(Keys::derive("ChangeMe").unwrap_err(), KeyError::WellKnown);
        assert_eq!(Keys::derive("short").unwrap_err(), KeyError::TooShort);
        assert!(Keys::derive(KEY).is_ok());
        assert_eq!(format!("{:?}", Keys::derive(KEY).unwrap()), "Keys(<redacted>)");
    }

    #[test]
    fn announcement_round_trip_and_rejections() {
        let keys = Keys::derive(KEY).unwrap();
        let now = 1_000_000;
        let a = announcement(now);
        let datagram = a.sign(&keys);
        let text = String::from_utf8(datagram.clone()).unwrap();
        assert!(!text.contains(KEY));
        let mut guard = ReplayGuard::new(30_000);
        assert_eq!(Announcement::verify(&datagram, &keys, now + 10, &mut guard), Ok(a.clone()));
        // The same datagram again: a replay.
        assert_eq!(Announcement::verify(&datagram, &keys, now + 20, &mut guard), Err(Rejection::Replay));
        // Another key.
        let other = Keys::derive("another registration key").unwrap();
        let mut fresh = ReplayGuard::new(30_000);
        assert_eq!(Announcement::verify(&datagram, &other, now, &mut fresh), Err(Rejection::WrongKey));
        // Too old.
        let old = announcement(now - 60_000).sign(&keys);
        assert_eq!(Announcement::verify(&old, &keys, now, &mut fresh), Err(Rejection::Stale));
        // Tampered: a changed port.
        let tampered = text.replace("8765", "8766").into_bytes();
        assert_eq!(Announcement::verify(&tampered, &keys, now, &mut fresh), Err(Rejection::WrongKey));
        // Another protocol version, properly signed.
        let mut v2 = announcement(now);
        v2.protocol = 2;
        assert_eq!(Announcement::verify(&v2.sign(&keys), &keys, now, &mut fresh), Err(Rejection::Version(2)));
        assert_eq!(Announcement::verify(b"not json", &keys, now, &mut fresh), Err(Rejection::Malformed));
    }

    #[test]
    fn request_signature_covers_method_path_time_and_body() {
        let keys = Keys::derive(KEY).unwrap();
        let now = 5_000_000;
        let s = Signature::sign(&keys, "POST", "/v1/push", b"body", now);
        let parsed = Signature::parse(&s.header()).unwrap();
        assert_eq!(parsed, s);
        let mut guard = ReplayGuard::new(30_000);
        assert_eq!(parsed.verify(&keys, "POST", "/v1/push", b"body", now, &mut guard), Ok(()));
        assert_eq!(parsed.verify(&keys, "POST", "/v1/push", b"body", now, &mut guard), Err(Rejection::Replay));
        let mut g = ReplayGuard::new(30_000);
        assert_eq!(s.verify(&keys, "POST", "/v1/pull", b"body", now, &mut g), Err(Rejection::WrongKey));
        assert_eq!(s.verify(&keys, "GET", "/v1/push", b"body", now, &mut g), Err(Rejection::WrongKey));
        assert_eq!(s.verify(&keys, "POST", "/v1/push", b"bodY", now, &mut g), Err(Rejection::WrongKey));
        assert_eq!(s.verify(&keys, "POST", "/v1/push", b"body", now + 31_000, &mut g), Err(Rejection::Stale));
        let other = Keys::derive("another registration key").unwrap();
        assert_eq!(s.verify(&other, "POST", "/v1/push", b"body", now, &mut g), Err(Rejection::WrongKey));
        assert_eq!(Signature::parse("1.2"), Err(Rejection::Malformed));
    }

    #[test]
    fn sealed_bodies_hide_content_and_detect_tampering() {
        let keys = Keys::derive(KEY).unwrap();
        let plain = br#"{"events": [{"data": {"name": "Ada Lovelace", "secret": "row value"}}]}"#.repeat(50);
        let sealed = seal(&keys, b"POST /v1/push", &plain);
        assert!(!sealed.windows(9).any(|w| w == b"row value"));
        assert!(sealed.len() < plain.len(), "compressed before encryption");
        assert_eq!(open(&keys, b"POST /v1/push", &sealed).unwrap(), plain);
        assert_eq!(open(&keys, b"POST /v1/pull", &sealed), Err(Rejection::WrongKey));
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(open(&keys, b"POST /v1/push", &flipped), Err(Rejection::WrongKey));
        let other = Keys::derive("another registration key").unwrap();
        assert_eq!(open(&other, b"POST /v1/push", &sealed), Err(Rejection::WrongKey));
    }

    #[test]
    fn derived_keys_differ_per_purpose_and_per_registration_key() {
        let a = Keys::derive(KEY).unwrap();
        let b = Keys::derive("another registration key").unwrap();
        assert_ne!(a.announce, a.request);
        assert_ne!(a.request, a.payload);
        assert_ne!(a.announce, b.announce);
    }
}
