//! The one way this crate takes a lock (mutex or read-write lock).

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `m`, taking over the data if a thread panicked while holding it.
///
/// Every value behind the crate's mutexes is replaced or updated whole by each critical
/// section (no multi-step invariant spans a panic point), so a poisoned lock still guards
/// consistent data. Taking it over keeps a panic in one thread (which ends that thread)
/// from spreading to the connection loop, the control socket or the other queues.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Locks `m` if nobody holds it (None: it is held), taking over the data if a thread
/// panicked while holding it (as [`lock`] does).
pub fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

/// Read-locks `l`, taking over the data if a writer panicked (as [`lock`] does).
pub fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

/// Write-locks `l`, taking over the data if a thread panicked holding it (as [`lock`] does).
pub fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}
