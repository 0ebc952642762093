//! Decisions a plugin said may be given again (`reuse-ms`): a bounded table per
//! plugin, keyed by exactly what the plugin was shown, so a request with the
//! same inputs is answered without a call into the plugin.
//!
//! The table is direct-mapped (the key's hash picks one slot; a newer decision
//! takes the slot over), so its memory is bounded by its size and
//! [`MAX_KEY_BYTES`], and a lookup is one hash, one uncontended lock and one
//! comparison of the whole key. It belongs to one loaded plugin: a reload
//! starts with an empty table.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::bindings::{Decision, Request, wit};

/// Longest the host gives a decision again, whatever the plugin asked.
pub(super) const MAX_REUSE: Duration = Duration::from_secs(300);

/// Inputs longer than this (serialised) are never looked up or kept, so one
/// table holds at most `slots × MAX_KEY_BYTES` of keys.
const MAX_KEY_BYTES: usize = 4096;

/// The decisions of one plugin that may be given again.
pub(super) struct Reuse {
    /// Boxed entries: an empty slot is two words.
    slots: Box<[Mutex<Option<Box<Entry>>>]>,
}

struct Entry {
    key: Box<[u8]>,
    decision: Decision,
    until: Instant,
    /// The plugin's documents generation when it was decided.
    generation: u64,
}

/// What a plugin was shown, serialised, and the slot it maps to.
pub(super) struct Key {
    bytes: Vec<u8>,
    slot: usize,
}

impl Reuse {
    /// A table of `entries` slots (rounded up to a power of two; at least one).
    pub(super) fn new(entries: usize) -> Reuse {
        Reuse {
            slots: (0..entries.max(1).next_power_of_two())
                .map(|_| Mutex::new(None))
                .collect(),
        }
    }

    /// The key of `req` as the plugin sees it; `None` when it is too long to keep.
    pub(super) fn key(&self, req: &Request<'_>) -> Option<Key> {
        let mut bytes = Vec::with_capacity(256);
        serialise(req, &mut bytes);
        if bytes.len() > MAX_KEY_BYTES {
            return None;
        }
        let hash = xxhash_rust::xxh3::xxh3_64(&bytes);
        // The slot count is a power of two.
        let slot = (hash as usize) & (self.slots.len() - 1);
        Some(Key { bytes, slot })
    }

    /// The decision kept for exactly this key, if it has not expired and was made on
    /// the plugin's current documents (`generation`).
    pub(super) fn get(&self, key: &Key, now: Instant, generation: u64) -> Option<Decision> {
        let slot = self.slots[key.slot]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = slot.as_ref()?;
        (entry.until > now && entry.generation == generation && *entry.key == *key.bytes)
            .then(|| entry.decision.clone())
    }

    /// Keeps `decision` for `key` from `now` for `ms` milliseconds (its
    /// [`reuse_ms`]), at most [`MAX_REUSE`].
    pub(super) fn put(
        &self,
        key: Key,
        decision: &Decision,
        now: Instant,
        ms: u32,
        generation: u64,
    ) {
        let entry = Entry {
            generation,
            key: key.bytes.into_boxed_slice(),
            decision: decision.clone(),
            until: now + Duration::from_millis(ms.into()).min(MAX_REUSE),
        };
        *self.slots[key.slot]
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Box::new(entry));
    }
}

/// How long the plugin allowed `decision` to be given again, in ms (0: not at all).
pub(super) fn reuse_ms(decision: &Decision) -> u32 {
    match decision {
        Decision::Continue(m) => m.reuse_ms,
        Decision::Deny(d) => d.reuse_ms,
    }
}

/// Every input of `req`, each length-prefixed and each option tagged, so two
/// requests serialise alike only when the plugin would see them alike.
fn serialise(req: &Request<'_>, out: &mut Vec<u8>) {
    fn count(out: &mut Vec<u8>, n: usize) {
        out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
    }
    fn text(out: &mut Vec<u8>, s: &str) {
        count(out, s.len());
        out.extend_from_slice(s.as_bytes());
    }
    fn opt(out: &mut Vec<u8>, s: Option<&str>) {
        match s {
            None => out.push(0),
            Some(s) => {
                out.push(1);
                text(out, s);
            }
        }
    }
    out.push(match req.kind {
        wit::RequestKind::Websocket => 0,
        wit::RequestKind::Http => 1,
    });
    for field in [req.method, req.scheme, req.authority, req.path, req.query] {
        opt(out, field);
    }
    count(out, req.headers.len());
    for h in req.headers {
        text(out, h.name);
        text(out, h.value);
    }
    opt(out, req.client_addr);
    opt(out, req.client_ip);
    match &req.tls {
        None => out.push(0),
        Some(tls) => {
            out.push(1);
            for field in [tls.sni, tls.alpn, tls.client_cert_subject] {
                opt(out, field);
            }
            count(out, tls.client_cert_names.len());
            for name in tls.client_cert_names {
                text(out, name);
            }
        }
    }
    opt(out, req.route);
    opt(out, req.tenant);
    match req.subprotocols {
        None => out.push(0),
        Some(list) => {
            out.push(1);
            count(out, list.len());
            for p in list {
                text(out, p);
            }
        }
    }
}
