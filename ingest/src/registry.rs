//! The device registry as ingest sees it: which devices are known and active (and their
//! optional shared secret), and which subject wears each device. Both are cached from the
//! store and refreshed periodically; a device missing from the cache is looked up in the store
//! once (with a short negative cache, so a flood of unknown IMEIs does not hammer the database).
//! Subjects are resolved through the assignment history: the cached current assignment for
//! fresh data, `Store::subject_for_device_at` for device times before it (buffered uploads of a
//! tag that was moved to another person are attributed to the right one).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use em_model::{Assignment, Device, DeviceId, SubjectId};
use em_store::{Store, StoreError};

/// Why a device is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not in the registry.
    Unknown,
    /// In the registry but deactivated.
    Inactive,
    /// The device authenticates with a secret and the one presented is wrong or missing.
    BadSecret,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Unknown => "unknown_device",
            Refusal::Inactive => "inactive_device",
            Refusal::BadSecret => "bad_secret",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A known device and, once looked up, its assignment history.
struct Known {
    device: Device,
    /// Full assignment history, fetched when one of the device's records did not match its
    /// current assignment (unassigned device, back-filled record from before the current
    /// wearer), with the time of the look-up: one store query per device and `negative_ttl`,
    /// not one per record in the pipeline worker. Kept in the device's own entry (no second
    /// key per device); an empty history shares one allocation.
    history: Option<(Instant, Arc<[Assignment]>)>,
}

impl Known {
    fn new(device: Device) -> Self {
        Known {
            device,
            history: None,
        }
    }
}

#[derive(Default)]
struct Cache {
    devices: HashMap<DeviceId, Known>,
    assignments: HashMap<DeviceId, Assignment>,
    /// Current device of each subject.
    by_subject: HashMap<SubjectId, DeviceId>,
    /// Devices recently found missing in the store, with the time of the look-up.
    misses: HashMap<DeviceId, Instant>,
}

/// Shared, cheap-to-clone registry cache.
#[derive(Clone)]
pub struct Registry {
    store: Arc<dyn Store>,
    cache: Arc<RwLock<Cache>>,
    negative_ttl: Duration,
    /// The history of every never-assigned device (shared, so caching it allocates nothing).
    empty_history: Arc<[Assignment]>,
}

/// Upper bound of the negative cache, so random IMEIs cannot grow memory without limit.
const MAX_MISSES: usize = 100_000;

impl Registry {
    /// Loads devices and current assignments from the store.
    pub async fn load(store: Arc<dyn Store>) -> Result<Self, StoreError> {
        let reg = Registry {
            store,
            cache: Arc::new(RwLock::new(Cache::default())),
            negative_ttl: Duration::from_secs(30),
            empty_history: Arc::from(Vec::new()),
        };
        reg.refresh().await?;
        Ok(reg)
    }

    /// Re-reads devices and current assignments from the store.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let devices = self.store.list_devices().await?;
        let assignments = self.store.current_assignments().await?;
        let mut c = self.write();
        c.devices = devices
            .into_iter()
            .map(|d| (d.device_id.clone(), Known::new(d)))
            .collect();
        c.by_subject = assignments
            .iter()
            .map(|a| (a.subject_id, a.device_id.clone()))
            .collect();
        c.assignments = assignments
            .into_iter()
            .map(|a| (a.device_id.clone(), a))
            .collect();
        c.misses.clear();
        Ok(())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Cache> {
        self.cache.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Cache> {
        self.cache.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The registry entry of `device_id` (cache first, then the store).
    pub async fn device(&self, device_id: &str) -> Result<Option<Device>, StoreError> {
        {
            let c = self.read();
            if let Some(k) = c.devices.get(device_id) {
                return Ok(Some(k.device.clone()));
            }
            if let Some(t) = c.misses.get(device_id) {
                if t.elapsed() < self.negative_ttl {
                    return Ok(None);
                }
            }
        }
        let found = self.store.get_device(device_id).await?;
        let mut c = self.write();
        match &found {
            Some(d) => {
                c.devices.insert(d.device_id.clone(), Known::new(d.clone()));
                c.misses.remove(device_id);
            }
            None => {
                if c.misses.len() >= MAX_MISSES {
                    let ttl = self.negative_ttl;
                    c.misses.retain(|_, t| t.elapsed() < ttl);
                    if c.misses.len() >= MAX_MISSES {
                        c.misses.clear();
                    }
                }
                c.misses.insert(device_id.to_owned(), Instant::now());
            }
        }
        Ok(found)
    }

    /// Admission check: the device must be registered and active; when `secret` is given
    /// (protocols that carry one) and the device has a secret, they must match.
    pub async fn admit(
        &self,
        device_id: &str,
        secret: Option<&str>,
    ) -> Result<Result<Device, Refusal>, StoreError> {
        let Some(dev) = self.device(device_id).await? else {
            return Ok(Err(Refusal::Unknown));
        };
        if !dev.active {
            return Ok(Err(Refusal::Inactive));
        }
        if let Some(expected) = dev.secret.as_deref() {
            if let Some(given) = secret {
                if !constant_time_eq(expected.as_bytes(), given.as_bytes()) {
                    return Ok(Err(Refusal::BadSecret));
                }
            }
        }
        Ok(Ok(dev))
    }

    /// Like [`admit`](Self::admit) but a device with a secret MUST present it.
    pub async fn admit_with_required_secret(
        &self,
        device_id: &str,
        secret: Option<&str>,
    ) -> Result<Result<Device, Refusal>, StoreError> {
        match self.admit(device_id, secret).await? {
            Ok(dev) if dev.secret.is_some() && secret.is_none() => Ok(Err(Refusal::BadSecret)),
            other => Ok(other),
        }
    }

    /// Current assignment of a device, from the cache.
    pub fn current_assignment(&self, device_id: &str) -> Option<Assignment> {
        self.read().assignments.get(device_id).cloned()
    }

    /// The device a subject currently wears, from the cache.
    pub fn device_of(&self, subject: SubjectId) -> Option<DeviceId> {
        self.read().by_subject.get(&subject).cloned()
    }

    /// All current assignments (device → subject), from the cache.
    pub fn current_assignments(&self) -> Vec<Assignment> {
        self.read().assignments.values().cloned().collect()
    }

    /// Subject wearing `device_id` at `at`.
    pub async fn subject_for(
        &self,
        device_id: &str,
        at: DateTime<Utc>,
    ) -> Result<Option<SubjectId>, StoreError> {
        if let Some(a) = self.read().assignments.get(device_id) {
            let before_end = match a.to {
                Some(to) => at < to,
                None => true,
            };
            if a.from <= at && before_end {
                return Ok(Some(a.subject_id));
            }
        }
        let cached = self
            .read()
            .devices
            .get(device_id)
            .and_then(|k| k.history.as_ref())
            .filter(|(t, _)| t.elapsed() < self.negative_ttl)
            .map(|(_, h)| h.clone());
        let history = match cached {
            Some(h) => h,
            None => {
                let found = self.store.assignments(device_id).await?;
                let h: Arc<[Assignment]> = if found.is_empty() {
                    self.empty_history.clone()
                } else {
                    found.into()
                };
                // Cached only for devices in the registry (unknown ones send no data).
                if let Some(k) = self.write().devices.get_mut(device_id) {
                    k.history = Some((Instant::now(), h.clone()));
                }
                h
            }
        };
        // Same rule as `Store::subject_for_device_at`: the latest assignment covering `at`.
        Ok(history
            .iter()
            .rev()
            .find(|a| a.from <= at && a.to.is_none_or(|to| at < to))
            .map(|a| a.subject_id))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn secret_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
