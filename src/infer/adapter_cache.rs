//! Adapters resident in memory for serving, bounded by count and bytes, least recently used
//! out first. Entries are immutable [`ServedAdapter`]s handed out as leases (`Arc`s): evicting
//! or deleting one never changes or frees weights that a running request holds.

use super::lora_batch::{AdapterLease, ServedAdapter};
use super::InferError;
use crate::db::adapters::AdapterRow;
use crate::lora::peft;
use crate::metrics::InferMetrics;
use crate::model::BaseModel;
use crate::store::{keys, ArtifactStore};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use uuid::Uuid;

pub const DEFAULT_MAX_ADAPTERS: usize = 64;
pub const DEFAULT_MAX_ADAPTER_BYTES: usize = 1 << 30;

struct Entry {
    adapter: AdapterLease,
    last_used: u64,
}

#[derive(Default)]
struct State {
    entries: HashMap<Uuid, Entry>,
    bytes: usize,
    clock: u64,
}

pub struct AdapterCache {
    state: Mutex<State>,
    max_count: usize,
    max_bytes: usize,
    metrics: Arc<InferMetrics>,
}

impl AdapterCache {
    pub fn new(max_count: usize, max_bytes: usize, metrics: Arc<InferMetrics>) -> Self {
        Self {
            state: Mutex::new(State::default()),
            max_count: max_count.max(1),
            max_bytes,
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent across a panic (every change is one assignment).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The resident adapter `id`, marked as just used.
    pub fn get(&self, id: Uuid) -> Option<AdapterLease> {
        let mut st = self.lock();
        st.clock += 1;
        let now = st.clock;
        let e = st.entries.get_mut(&id)?;
        e.last_used = now;
        Some(e.adapter.clone())
    }

    /// Makes `adapter` resident (keeping an equal one already there) and evicts the least
    /// recently used others while over the bounds.
    pub fn insert(&self, adapter: AdapterLease) -> AdapterLease {
        let mut st = self.lock();
        st.clock += 1;
        let now = st.clock;
        if let Some(e) = st.entries.get_mut(&adapter.id) {
            e.last_used = now;
            return e.adapter.clone();
        }
        st.bytes += adapter.size_in_bytes();
        st.entries.insert(
            adapter.id,
            Entry {
                adapter: adapter.clone(),
                last_used: now,
            },
        );
        while st.entries.len() > self.max_count || st.bytes > self.max_bytes {
            let victim = st
                .entries
                .iter()
                .filter(|(id, _)| **id != adapter.id)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(id, _)| *id);
            let Some(victim) = victim else { break };
            if let Some(e) = st.entries.remove(&victim) {
                st.bytes -= e.adapter.size_in_bytes();
                self.metrics.cache_eviction();
            }
        }
        self.metrics.set_cache_size(st.entries.len(), st.bytes);
        adapter
    }

    /// Forgets `id` (its files are gone); requests holding it keep their lease.
    pub fn remove(&self, id: Uuid) {
        let mut st = self.lock();
        if let Some(e) = st.entries.remove(&id) {
            st.bytes -= e.adapter.size_in_bytes();
        }
        self.metrics.set_cache_size(st.entries.len(), st.bytes);
    }

    /// The adapter of registry row `row`, loaded from the store on first use.
    pub async fn lease(
        &self,
        row: &AdapterRow,
        store: &dyn ArtifactStore,
        base: &Arc<BaseModel>,
    ) -> Result<AdapterLease, InferError> {
        if let Some(a) = self.get(row.id) {
            self.metrics.cache_hit();
            return Ok(a);
        }
        self.metrics.cache_miss();
        let started = Instant::now();
        let failed = |detail: String| InferError::AdapterLoad {
            id: row.id.to_string(),
            detail,
        };
        let config = store
            .read(&keys::adapter_file(row.id, peft::CONFIG_FILE))
            .await
            .map_err(|e| failed(e.to_string()))?;
        let weights = store
            .read(&keys::adapter_file(row.id, peft::WEIGHTS_FILE))
            .await
            .map_err(|e| failed(e.to_string()))?;
        let base = base.clone();
        let id = row.id;
        let served = tokio::task::spawn_blocking(move || {
            let text = String::from_utf8_lossy(&config);
            let origin = std::path::Path::new(peft::CONFIG_FILE);
            let device = base.llama.device();
            let adapter = peft::from_bytes(
                origin,
                &text,
                &weights,
                base.llama.config(),
                &candle_core::Device::Cpu,
            )?;
            ServedAdapter::new(id, &adapter, device)
        })
        .await
        .map_err(|e| failed(e.to_string()))?
        .map_err(|e| failed(e.to_string()))?;
        self.metrics.observe_adapter_load(started.elapsed());
        Ok(self.insert(Arc::new(served)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::{Adapter, LoraConfig, LoraPair};
    use crate::model::{LinearId, Proj};
    use candle_core::{Device, Tensor};

    fn served(id: Uuid, floats: usize) -> AdapterLease {
        let id_q = LinearId {
            layer: 0,
            proj: Proj::Q,
        };
        let half = floats / 2;
        let pair = LoraPair {
            a: Tensor::zeros((1, half), candle_core::DType::F32, &Device::Cpu).unwrap(),
            b: Tensor::zeros((half, 1), candle_core::DType::F32, &Device::Cpu).unwrap(),
        };
        let adapter = Adapter {
            config: LoraConfig {
                r: 1,
                ..LoraConfig::default()
            },
            base_model: String::new(),
            pairs: [(id_q, pair)].into_iter().collect(),
        };
        Arc::new(ServedAdapter::new(id, &adapter, &Device::Cpu).unwrap())
    }

    #[test]
    fn evicts_least_recently_used_within_count_and_bytes_and_leases_survive() {
        let metrics = Arc::new(InferMetrics::default());
        let cache = AdapterCache::new(2, 10_000, metrics.clone());
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let lease_a = cache.insert(served(a, 100));
        cache.insert(served(b, 100));
        assert!(cache.get(a).is_some()); // a is now more recent than b
        cache.insert(served(c, 100));
        assert!(cache.get(b).is_none(), "b was least recently used");
        assert!(cache.get(a).is_some() && cache.get(c).is_some());
        assert_eq!(metrics.cache_counts().2, 1);
        // Over the byte bound: everything else goes, the newcomer stays.
        let big = Uuid::new_v4();
        cache.insert(served(big, 2450));
        assert!(cache.get(big).is_some());
        assert!(cache.get(a).is_none() && cache.get(c).is_none());
        // An evicted adapter's lease is still whole.
        assert_eq!(lease_a.id, a);
        assert_eq!(lease_a.size_in_bytes(), 400);
        cache.remove(big);
        assert!(cache.get(big).is_none());
    }
}
