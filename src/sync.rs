//! The one way this crate takes a mutex.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking over the data if a thread panicked while holding it.
///
/// Every value behind the crate's mutexes is replaced or updated whole by each critical
/// section (no multi-step invariant spans a panic point), so a poisoned lock still guards
/// consistent data. Taking it over keeps a panic in one thread (which ends that thread)
/// from spreading to the connection loop, the control socket or the other queues.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
