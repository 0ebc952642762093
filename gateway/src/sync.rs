//! Locks that outlive a panic.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// [`Mutex::lock`] that takes the data even when a thread panicked while holding it.
/// Every critical section in the gateway leaves its data whole between statements, so a
/// panic in one task (a bug) must not turn every later connection's lock into a panic too.
pub trait Hold<T: ?Sized> {
    /// Locks, recovering the guard from a poisoned lock.
    fn hold(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> Hold<T> for Mutex<T> {
    fn hold(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_lock_poisoned_by_a_panic_still_hands_out_its_data() {
        let m = Arc::new(Mutex::new(1));
        let held = Arc::clone(&m);
        let panicked = std::thread::spawn(move || {
            let mut g = held.lock().unwrap();
            *g = 2;
            panic!("while holding the lock");
        })
        .join();
        assert!(panicked.is_err());
        assert!(m.is_poisoned());
        assert_eq!(*m.hold(), 2);
    }
}
