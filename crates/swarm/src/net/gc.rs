//! The blob store and the gate that keeps its garbage collector honest.
//!
//! Fetched and published blobs are only kept while a round's tags hold them,
//! so a node's memory stays bounded over a long run. That takes a collector,
//! and iroh-blobs' `MemStore` collector deletes blobs created between its
//! mark and its sweep although they are tagged: an update published (or a
//! download started) in that window was lost and its fetchers saw "stream
//! reset" (seen in the demo). The [`GcGate`] closes that window.

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use iroh_blobs::{
    api::Store,
    store::{
        GcConfig, ProtectCb, ProtectOutcome,
        mem::{MemStore, Options},
    },
};

/// How often unreferenced blobs are collected.
pub(super) const GC_INTERVAL: Duration = Duration::from_secs(5);

/// Longest a GC run may hold back blob creation (a canary that outlived its
/// sweep only costs this once).
const GC_HOLD_LIMIT: Duration = Duration::from_secs(2);

/// Keeps blob creation out of the store's garbage-collection window.
///
/// Every operation that creates a blob or its first tag holds a read guard
/// for those few milliseconds; each GC run takes the write guard in its
/// protect callback (before marking) and holds it until an untagged canary
/// blob added there is gone, i.e. until the sweep has taken its list.
#[derive(Clone, Default)]
pub(super) struct GcGate(Arc<tokio::sync::RwLock<()>>);

impl GcGate {
    /// Wait out a GC run in progress and keep the next one from starting.
    pub(super) async fn creating(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.0.read().await
    }

    /// The store's protect callback: take the write guard for this run.
    fn protect(&self, store: Arc<OnceLock<Store>>) -> ProtectCb {
        let gate = self.0.clone();
        Arc::new(move |_live| {
            let (gate, store) = (gate.clone(), store.clone());
            // The callback's future must be `Sync`; the store's futures are
            // not, so the work runs in a task and the callback awaits it.
            let task = tokio::spawn(async move {
                let Some(store) = store.get().cloned() else {
                    return ProtectOutcome::Abort;
                };
                let guard = gate.write_owned().await;
                // Unique to this run, so an older canary cannot stand in.
                let canary: [u8; 16] = rand::random();
                let hash = match store.add_slice(canary).temp_tag().await {
                    // Dropping the temp tag leaves the canary unreferenced.
                    Ok(tt) => tt.hash(),
                    Err(_) => return ProtectOutcome::Abort,
                };
                tokio::spawn(async move {
                    let end = tokio::time::Instant::now() + GC_HOLD_LIMIT;
                    while tokio::time::Instant::now() < end
                        && store.has(hash).await.unwrap_or(false)
                    {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    drop(guard);
                });
                ProtectOutcome::Continue
            });
            Box::pin(async move { task.await.unwrap_or(ProtectOutcome::Abort) })
        })
    }
}

/// An in-memory blob store collecting garbage every [`GC_INTERVAL`], and
/// the gate its blob creation must go through.
pub(super) fn gated_store() -> (MemStore, GcGate) {
    let gate = GcGate::default();
    let slot = Arc::new(OnceLock::new());
    let store = MemStore::new_with_opts(Options {
        gc_config: Some(GcConfig {
            interval: GC_INTERVAL,
            add_protected: Some(gate.protect(slot.clone())),
        }),
    });
    let _ = slot.set(Store::clone(&store));
    (store, gate)
}
