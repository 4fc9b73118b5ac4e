//! The device registry as ingest sees it: which devices are known and active (their
//! protocol and, for protocols that carry one, the hash of their secret), the one admission
//! check every entry point uses ([`Registry::admit`]), and which subject wears each device.
//! Both are cached from the store and refreshed periodically; a device missing from the cache
//! is looked up in the store once (with a short negative cache, so a flood of unknown IMEIs
//! does not hammer the database).
//! Subjects are resolved through the assignment history: the cached current assignment for
//! fresh data, `Store::subject_for_device_at` for device times before it (buffered uploads of a
//! tag that was moved to another person are attributed to the right one).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use em_model::{Assignment, Device, DeviceId, Protocol, SubjectId};
use em_store::{device_secret, Store, StoreError};

/// Why a device (or a connection) is refused. The reason is what metrics count
/// (`em_devices_rejected_total{protocol, reason}`) and logs name; it never carries the secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not in the registry.
    Unknown,
    /// In the registry but deactivated.
    Inactive,
    /// Registered under another protocol (a device is admitted only on its own).
    WrongProtocol,
    /// The protocol carries a secret (OsmAnd token, MQTT password) and none was presented.
    MissingCredential,
    /// The secret presented is not the device's.
    BadCredential,
    /// The device's protocol needs a secret but none is registered for it: the operator must
    /// set one (the dashboard generates it) before the device can connect.
    NoRegisteredSecret,
    /// The connection came from a network not in the listener's `allow` list (checked before
    /// anything is read, see `config::AllowList`).
    SourceNotAllowed,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Unknown => "unknown_device",
            Refusal::Inactive => "inactive_device",
            Refusal::WrongProtocol => "wrong_protocol",
            Refusal::MissingCredential => "missing_credential",
            Refusal::BadCredential => "bad_credential",
            Refusal::NoRegisteredSecret => "no_registered_secret",
            Refusal::SourceNotAllowed => "source_not_allowed",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a device presented to prove who it is, besides its id.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Credential<'a> {
    /// Nothing: the protocol cannot carry a secret (GT06, Teltonika, H02: the IMEI is the only
    /// identity, so the network is the control — private APN/VPN, listener allow lists), or
    /// the device sent none.
    None,
    /// The secret the device presented: the OsmAnd token, the MQTT CONNECT password.
    Secret(&'a str),
    /// Already authenticated by the external MQTT broker this subscriber reads from: the
    /// broker checked the device's username (= device id) and password, and its ACL lets the
    /// device publish only below `em/v1/<its id>/` (see the README, "Production"). Valid only
    /// for [`Protocol::Em`].
    Broker,
}

impl<'a> From<Option<&'a str>> for Credential<'a> {
    fn from(v: Option<&'a str>) -> Self {
        v.map_or(Credential::None, Credential::Secret)
    }
}

impl std::fmt::Debug for Credential<'_> {
    /// Never prints the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credential::None => "None",
            Credential::Secret(_) => "Secret(***)",
            Credential::Broker => "Broker",
        })
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

    /// THE admission check, used by every entry point (TCP listeners, OsmAnd, the MQTT
    /// subscriber, the in-process MQTT endpoint with the CONNECT password):
    ///
    /// 1. the device is registered ([`Refusal::Unknown`]) and active ([`Refusal::Inactive`]);
    /// 2. it arrives on the protocol it is registered for ([`Refusal::WrongProtocol`]) — a tag
    ///    registered as EM is not accepted over GT06, a GT06 tag not over OsmAnd;
    /// 3. for protocols that carry a secret (OsmAnd, EM) the device has one registered
    ///    ([`Refusal::NoRegisteredSecret`]), presents it ([`Refusal::MissingCredential`]) and it
    ///    matches the stored hash in constant time ([`Refusal::BadCredential`]); for EM,
    ///    [`Credential::Broker`] stands for a check already made by the external broker.
    ///    IMEI-only protocols (GT06, Teltonika, H02) carry none: identity is the IMEI.
    ///
    /// `credential` is a [`Credential`] or an `Option<&str>` (`Some(password)`).
    /// The outer `Err` is a store failure (the caller lets the device retry).
    pub async fn admit<'c>(
        &self,
        device_id: &str,
        protocol: Protocol,
        credential: impl Into<Credential<'c>>,
    ) -> Result<Result<Device, Refusal>, StoreError> {
        let Some(dev) = self.device(device_id).await? else {
            return Ok(Err(Refusal::Unknown));
        };
        Ok(check(dev, protocol, credential.into()))
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

/// The admission rules of [`Registry::admit`] for a registered device (pure).
fn check(dev: Device, protocol: Protocol, credential: Credential<'_>) -> Result<Device, Refusal> {
    if !dev.active {
        return Err(Refusal::Inactive);
    }
    if dev.protocol != protocol {
        return Err(Refusal::WrongProtocol);
    }
    if !protocol.carries_secret() {
        return Ok(dev);
    }
    match credential {
        Credential::Broker if protocol == Protocol::Em => Ok(dev),
        Credential::Broker | Credential::None => Err(Refusal::MissingCredential),
        Credential::Secret(given) => match dev.secret.as_deref() {
            None => Err(Refusal::NoRegisteredSecret),
            Some(stored) if device_secret::verify(stored, given) => Ok(dev),
            Some(_) => Err(Refusal::BadCredential),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(protocol: Protocol, secret: Option<&str>) -> Device {
        Device {
            device_id: "d1".into(),
            protocol,
            secret: secret.map(device_secret::hash),
            active: true,
            class: Default::default(),
        }
    }

    #[test]
    fn admission_rules() {
        use Credential as C;
        use Protocol as P;
        let em = dev(P::Em, Some("em-secret-0123456789"));
        assert!(check(em.clone(), P::Em, C::Secret("em-secret-0123456789")).is_ok());
        assert_eq!(
            check(em.clone(), P::Em, C::Secret("em-secret-012345678X")),
            Err(Refusal::BadCredential)
        );
        assert_eq!(
            check(em.clone(), P::Em, C::None),
            Err(Refusal::MissingCredential)
        );
        assert!(check(em.clone(), P::Em, C::Broker).is_ok());
        for p in [P::Gt06, P::H02, P::Teltonika, P::Osmand] {
            assert_eq!(
                check(em.clone(), p, C::None),
                Err(Refusal::WrongProtocol),
                "{p}"
            );
        }
        let gt06 = dev(P::Gt06, None);
        assert!(check(gt06.clone(), P::Gt06, C::None).is_ok());
        assert_eq!(
            check(gt06.clone(), P::Osmand, C::None),
            Err(Refusal::WrongProtocol)
        );
        assert_eq!(check(gt06, P::Em, C::Broker), Err(Refusal::WrongProtocol));
        let osm = dev(P::Osmand, Some("osmand-token-0123456"));
        assert_eq!(
            check(osm.clone(), P::Osmand, C::Broker),
            Err(Refusal::MissingCredential)
        );
        assert!(check(osm.clone(), P::Osmand, C::Secret("osmand-token-0123456")).is_ok());
        assert_eq!(
            check(dev(P::Osmand, None), P::Osmand, C::Secret("anything")),
            Err(Refusal::NoRegisteredSecret)
        );
        let off = Device {
            active: false,
            ..osm
        };
        assert_eq!(
            check(off, P::Osmand, C::Secret("osmand-token-0123456")),
            Err(Refusal::Inactive)
        );
    }

    #[test]
    fn credential_debug_hides_the_secret() {
        let s = format!("{:?}", Credential::from(Some("top-secret")));
        assert!(!s.contains("top-secret"), "{s}");
    }
}
