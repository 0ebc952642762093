//! Decisions a plugin said may be given again (`reuse-ms`): a bounded table per
//! plugin, keyed by exactly what the plugin was shown, so a request with the
//! same inputs is answered without a call into the plugin.
//!
//! The table is direct-mapped (the key's hash picks one slot; a newer decision
//! takes the slot over), so its memory is bounded by its size and
//! [`MAX_KEY_BYTES`], and a lookup is one hash, one uncontended lock and one
//! comparison of the whole key. It belongs to one loaded plugin: a reload
//! starts with an empty table.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::bindings::{Decision, Request, wit};
use crate::sync::Hold;

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
        let bytes = serialise(req);
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
        let slot = self.slots[key.slot].hold();
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
        *self.slots[key.slot].hold() = Some(Box::new(entry));
    }
}

/// Every input of `req`: its text, and the kind and counts that say what the text's
/// parts are, so two requests serialise alike only when the plugin would see them alike.
/// Allocated at exactly its length, so the key becomes a boxed slice without a copy.
fn serialise(req: &Request<'_>) -> Vec<u8> {
    let flags = req.fields.as_array();
    let mut out = Vec::with_capacity(2 + 4 * flags.len() + 4 * 3 + req.text.len());
    out.push(match req.kind {
        wit::RequestKind::Websocket => 0,
        wit::RequestKind::Http => 1,
    });
    out.push(u8::from(req.tls_on));
    for n in flags {
        out.extend_from_slice(&n.to_le_bytes());
    }
    for n in [req.cert_names, req.subprotocols, req.headers] {
        out.extend_from_slice(&n.to_le_bytes());
    }
    out.extend_from_slice(req.text.as_bytes());
    debug_assert_eq!(out.len(), out.capacity());
    out
}
