//! Tokens this instance has already verified, so a client that reconnects with
//! the same token skips the signature check and the JSON parse (HS256 costs
//! about 3.5 µs per token in wasm; RS256 and ES256 far more).
//!
//! Only tokens that passed every check are kept, with what the plugin needs
//! from them: the time claims (re-checked against the clock on every hit, so
//! a cached token still expires on time) and the claims it forwards. The full
//! token is compared on lookup; the hash only picks the slot. The cache is a
//! fixed number of slots, direct-mapped: a new token takes its slot over, so
//! memory is bounded and a flood of distinct tokens only costs re-checks.

use std::cell::RefCell;
use std::rc::Rc;

/// What a verified token contributes to a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// `exp`, seconds since the epoch.
    pub exp: Option<u64>,
    /// `nbf`, seconds since the epoch.
    pub nbf: Option<u64>,
    /// The value of each forwarded claim, in the config's order (`None`: absent).
    pub forwarded: Vec<Option<String>>,
    /// The `sub` claim, for the access log.
    pub sub: Option<String>,
}

/// One slot: a token and what it gave.
type Slot = Option<(String, Rc<Verified>)>;

/// A bounded map from token to [`Verified`].
#[derive(Debug)]
pub struct Cache {
    slots: RefCell<Vec<Slot>>,
}

impl Cache {
    /// Room for about `size` tokens (rounded up to a power of two); 0 caches nothing.
    pub fn new(size: usize) -> Self {
        let len = if size == 0 {
            0
        } else {
            size.next_power_of_two()
        };
        Cache {
            slots: RefCell::new(vec![None; len]),
        }
    }

    /// The entry for exactly this token, if it is cached.
    pub fn get(&self, token: &str) -> Option<Rc<Verified>> {
        let slots = self.slots.borrow();
        let (cached, verified) = slots.get(slot(token, slots.len())?)?.as_ref()?;
        same(cached, token).then(|| verified.clone())
    }

    /// Keep `verified` for `token`, in place of whatever held its slot; returns it.
    pub fn put(&self, token: &str, verified: Verified) -> Rc<Verified> {
        let verified = Rc::new(verified);
        let mut slots = self.slots.borrow_mut();
        if let Some(i) = slot(token, slots.len()) {
            slots[i] = Some((token.to_owned(), verified.clone()));
        }
        verified
    }
}

impl Cache {
    /// Forget every token (the keys changed: a token of a removed key must be checked
    /// again, and refused).
    pub fn clear(&self) {
        self.slots.borrow_mut().iter_mut().for_each(|s| *s = None);
    }
}

/// The slot of `token` among `len` (a power of two): from its last eight bytes, which
/// are its signature's, unpredictable for every genuine token, and its length. A
/// forger who picks them can only take slots over, which costs re-checks, as a flood
/// of distinct tokens would. Hashing the whole token (SipHash) cost more than a
/// tenth of a verify.
fn slot(token: &str, len: usize) -> Option<usize> {
    if len == 0 {
        return None;
    }
    let bytes = token.as_bytes();
    let mut tail = [0u8; 8];
    let n = bytes.len().min(8);
    tail[8 - n..].copy_from_slice(&bytes[bytes.len() - n..]);
    // Fibonacci hashing: the product's top bits depend on every bit of the input.
    let mixed = (u64::from_le_bytes(tail) ^ bytes.len() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let top = mixed.checked_shr(64 - len.trailing_zeros()).unwrap_or(0);
    Some(top as usize & (len - 1))
}

/// Whether two tokens are the same, comparing their signatures' ends first: tokens of
/// one issuer share their first bytes (header and leading claims).
fn same(a: &str, b: &str) -> bool {
    let tail = a.len().min(16);
    a.len() == b.len()
        && sluice_jwt::same(
            &a.as_bytes()[a.len() - tail..],
            &b.as_bytes()[b.len() - tail..],
        )
        && sluice_jwt::same(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(sub: &str) -> Verified {
        Verified {
            exp: Some(10),
            nbf: None,
            forwarded: vec![Some(sub.into())],
            sub: Some(sub.into()),
        }
    }

    #[test]
    fn hits_only_the_same_token() {
        let cache = Cache::new(8);
        cache.put("a.b.c", entry("alice"));
        assert_eq!(cache.get("a.b.c").as_deref(), Some(&entry("alice")));
        assert_eq!(cache.get("a.b.d"), None);
    }

    #[test]
    fn slots_spread_and_only_equal_tokens_are_the_same() {
        let used: std::collections::HashSet<_> = (0..64)
            .map(|i| slot(&format!("eyJhbGciOi.eyJzdWIiOi.sig{i:08x}"), 256).unwrap())
            .collect();
        assert!(
            used.len() > 48,
            "64 tokens took only {} of 256 slots",
            used.len()
        );
        assert!(same("a.b.c", "a.b.c"));
        assert!(!same("a.b.c", "a.b.d"));
        assert!(!same("x.b.c", "a.b.c"), "the ends agree, the starts do not");
        assert!(!same("a.b.c", "a.b.cc"));
        assert_eq!(slot("", 4), slot("", 4));
    }

    #[test]
    fn is_bounded_and_zero_disables_it() {
        let cache = Cache::new(4);
        for i in 0..100 {
            cache.put(&format!("t{i}"), entry("x"));
        }
        assert_eq!(cache.slots.borrow().len(), 4);
        assert!(
            cache.get("t99").is_some(),
            "the newest token keeps its slot"
        );
        let off = Cache::new(0);
        off.put("a.b.c", entry("alice"));
        assert_eq!(off.get("a.b.c"), None);
    }
}
