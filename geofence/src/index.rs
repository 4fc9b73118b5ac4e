//! The shared zone index: compiled zones, one `rstar` R-tree over their bounding boxes,
//! subject/group bindings, and the latest positions of devices that dynamic zones follow.

use crate::geometry::{BBox, CompiledGeometry};
use crate::schedule::CompiledSchedule;
use crate::GeofenceError;
use chrono::{DateTime, Duration, Utc};
use em_model::{DeviceId, Record, SubjectId, ZoneId, ZoneKind, ZoneSpec};
use rstar::{RStarInsertionStrategy, RTree, RTreeObject, RTreeParams, AABB};
use rustc_hash::FxHashMap as HashMap;
use std::collections::BTreeSet;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Default age after which another device's position no longer defines a dynamic zone.
pub const DEFAULT_PEER_MAX_AGE_SECS: i64 = 600;

type GroupKey = u32;

/// A compiled, validated zone.
#[derive(Debug, Clone, PartialEq)]
pub struct Zone {
    pub id: ZoneId,
    pub subject_id: Option<SubjectId>,
    pub group: Option<String>,
    group_key: Option<GroupKey>,
    pub name: String,
    pub kind: ZoneKind,
    pub is_curfew_home: bool,
    pub geometry: CompiledGeometry,
    /// None = always active (within the order dates).
    pub schedule: Option<CompiledSchedule>,
    /// Changes on every upsert, so monitors notice edits.
    pub version: u64,
}

impl Zone {
    /// Signed distance to the boundary in metres (negative inside); None for dynamic zones.
    pub fn signed_distance_m(&self, lon: f64, lat: f64) -> Option<f64> {
        self.geometry.signed_distance_m(lon, lat)
    }

    /// The device a dynamic zone follows.
    pub fn dynamic_device(&self) -> Option<&str> {
        match &self.geometry {
            CompiledGeometry::Dynamic { device_id, .. } => Some(device_id),
            _ => None,
        }
    }

    /// Curfew = an inclusion zone marked as the curfew home.
    pub fn is_curfew(&self) -> bool {
        self.is_curfew_home && self.kind == ZoneKind::Inclusion
    }

    /// Zones a subject must be evaluated against on every fix wherever it is: inclusion
    /// zones (being far away is the breach) and dynamic zones (their centre moves).
    pub fn is_standing(&self) -> bool {
        self.kind == ZoneKind::Inclusion || self.dynamic_device().is_some()
    }
}

/// A zone near a point, with the point's signed distance to its boundary.
#[derive(Debug, Clone, Copy)]
pub struct ZoneMatch<'a> {
    pub zone: &'a Zone,
    /// Metres, negative inside.
    pub signed_distance_m: f64,
}

/// Latest known position of a device followed by dynamic zones.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeerFix {
    pub lon: f64,
    pub lat: f64,
    pub accuracy_m: f64,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct TreeEntry {
    env: AABB<[f64; 2]>,
    zone_id: ZoneId,
    /// Owner copied from the zone so candidates of other subjects are skipped cheaply.
    subject: Option<SubjectId>,
    group: Option<GroupKey>,
}

/// Wider nodes than rstar's default (6): fewer levels, children scanned contiguously,
/// faster point queries on 100k+ entries (measured in the geofence bench).
#[derive(Debug, Clone, Copy)]
struct ZoneTreeParams;

impl RTreeParams for ZoneTreeParams {
    const MIN_SIZE: usize = 6;
    const MAX_SIZE: usize = 16;
    const REINSERTION_COUNT: usize = 4;
    type DefaultInsertionStrategy = RStarInsertionStrategy;
}

impl RTreeObject for TreeEntry {
    type Envelope = AABB<[f64; 2]>;
    fn envelope(&self) -> Self::Envelope {
        self.env
    }
}

/// Envelopes for a box, with a copy shifted by ±360° when it crosses the antimeridian.
fn envelopes(b: &BBox) -> impl Iterator<Item = AABB<[f64; 2]>> {
    let env = |shift: f64| {
        AABB::from_corners(
            [b.min_lon + shift, b.min_lat],
            [b.max_lon + shift, b.max_lat],
        )
    };
    let main = Some(env(0.0));
    let east = (b.max_lon > 180.0).then(|| env(-360.0));
    let west = (b.min_lon < -180.0).then(|| env(360.0));
    main.into_iter().chain(east).chain(west)
}

/// All zones of the platform. `Send + Sync`; share it with [`SharedZoneIndex`].
#[derive(Debug)]
pub struct ZoneIndex {
    zones: HashMap<ZoneId, Zone>,
    tree: RTree<TreeEntry, ZoneTreeParams>,
    group_keys: HashMap<String, GroupKey>,
    /// Standing (inclusion and dynamic) zones per owning subject / group.
    subject_standing: HashMap<SubjectId, Vec<ZoneId>>,
    group_standing: HashMap<GroupKey, Vec<ZoneId>>,
    subject_groups: HashMap<SubjectId, Vec<GroupKey>>,
    group_members: HashMap<GroupKey, BTreeSet<SubjectId>>,
    dynamic_by_device: HashMap<DeviceId, Vec<ZoneId>>,
    peers: RwLock<HashMap<DeviceId, PeerFix>>,
    peer_max_age: Duration,
    next_version: u64,
    instance_id: u64,
    generation: u64,
    /// Set while `upsert_many` loads: the tree is rebuilt once at the end.
    defer_tree: bool,
}

static NEXT_INSTANCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Default for ZoneIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl ZoneIndex {
    pub fn new() -> Self {
        ZoneIndex {
            zones: HashMap::default(),
            tree: RTree::new_with_params(),
            group_keys: HashMap::default(),
            subject_standing: HashMap::default(),
            group_standing: HashMap::default(),
            subject_groups: HashMap::default(),
            group_members: HashMap::default(),
            dynamic_by_device: HashMap::default(),
            peers: RwLock::new(HashMap::default()),
            peer_max_age: Duration::seconds(DEFAULT_PEER_MAX_AGE_SECS),
            next_version: 1,
            instance_id: NEXT_INSTANCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            generation: 0,
            defer_tree: false,
        }
    }

    /// How old another device's position may be and still define its dynamic zones.
    pub fn set_peer_max_age(&mut self, max_age: Duration) {
        self.peer_max_age = max_age;
    }

    /// Identifies this index instance (monitors re-sync when used with another index).
    pub fn instance_id(&self) -> u64 {
        self.instance_id
    }

    /// Changes whenever zones or group bindings change.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn len(&self) -> usize {
        self.zones.len()
    }

    pub fn is_empty(&self) -> bool {
        self.zones.is_empty()
    }

    pub fn zone(&self, id: ZoneId) -> Option<&Zone> {
        self.zones.get(&id)
    }

    pub fn zones(&self) -> impl Iterator<Item = &Zone> {
        self.zones.values()
    }

    fn group_key(&mut self, group: &str) -> GroupKey {
        let next = u32::try_from(self.group_keys.len()).unwrap_or(u32::MAX);
        *self.group_keys.entry(group.to_string()).or_insert(next)
    }

    /// Validate, compile and insert or replace a zone. On error the index is unchanged.
    pub fn upsert(&mut self, spec: &ZoneSpec) -> Result<(), GeofenceError> {
        let group = spec
            .group
            .as_deref()
            .map(str::trim)
            .filter(|g| !g.is_empty());
        if spec.subject_id.is_none() && group.is_none() {
            return Err(GeofenceError::NoOwner { zone_id: spec.id });
        }
        let geometry = CompiledGeometry::compile(spec.id, &spec.geometry)?;
        let schedule = spec
            .schedule
            .as_ref()
            .map(CompiledSchedule::compile)
            .transpose()
            .map_err(|e| match e {
                GeofenceError::InvalidSchedule(r) => {
                    GeofenceError::InvalidSchedule(format!("zone {}: {r}", spec.id))
                }
                other => other,
            })?;
        self.remove(spec.id);
        self.generation = self.generation.wrapping_add(1);
        let group_key = group.map(|g| self.group_key(g));
        let version = self.next_version;
        self.next_version = self.next_version.wrapping_add(1);
        let zone = Zone {
            id: spec.id,
            subject_id: spec.subject_id,
            group: group.map(str::to_string),
            group_key,
            name: spec.name.clone(),
            kind: spec.kind,
            is_curfew_home: spec.is_curfew_home,
            geometry,
            schedule,
            version,
        };
        if let Some(b) = zone.geometry.bbox().filter(|_| !self.defer_tree) {
            for env in envelopes(&b) {
                self.tree.insert(TreeEntry {
                    env,
                    zone_id: zone.id,
                    subject: zone.subject_id,
                    group: zone.group_key,
                });
            }
        }
        if zone.is_standing() {
            if let Some(s) = zone.subject_id {
                self.subject_standing.entry(s).or_default().push(zone.id);
            }
            if let Some(g) = group_key {
                self.group_standing.entry(g).or_default().push(zone.id);
            }
        }
        if let Some(dev) = zone.dynamic_device() {
            self.dynamic_by_device
                .entry(dev.to_string())
                .or_default()
                .push(zone.id);
        }
        self.zones.insert(zone.id, zone);
        Ok(())
    }

    /// Load many zones at once and bulk-load the R-tree (a better-packed tree than one
    /// built by single inserts, so faster queries). Valid specs are applied even if others
    /// fail; returns the rejected ones with their errors.
    pub fn upsert_many<'a>(
        &mut self,
        specs: impl IntoIterator<Item = &'a ZoneSpec>,
    ) -> Vec<(ZoneId, GeofenceError)> {
        self.defer_tree = true;
        let errors = specs
            .into_iter()
            .filter_map(|spec| self.upsert(spec).err().map(|e| (spec.id, e)))
            .collect();
        self.defer_tree = false;
        self.rebuild_tree();
        errors
    }

    /// Rebuild the R-tree from all zones with bulk loading (after heavy churn, or to
    /// compact a tree built by many single inserts).
    pub fn rebuild_tree(&mut self) {
        let entries: Vec<TreeEntry> = self
            .zones
            .values()
            .filter_map(|z| z.geometry.bbox().map(|b| (z, b)))
            .flat_map(|(z, b)| {
                envelopes(&b).map(move |env| TreeEntry {
                    env,
                    zone_id: z.id,
                    subject: z.subject_id,
                    group: z.group_key,
                })
            })
            .collect();
        self.tree = RTree::bulk_load_with_params(entries);
    }

    /// Remove a zone; returns whether it existed.
    pub fn remove(&mut self, id: ZoneId) -> bool {
        let Some(zone) = self.zones.remove(&id) else {
            return false;
        };
        self.generation = self.generation.wrapping_add(1);
        if let Some(b) = zone.geometry.bbox().filter(|_| !self.defer_tree) {
            for env in envelopes(&b) {
                self.tree.remove(&TreeEntry {
                    env,
                    zone_id: id,
                    subject: zone.subject_id,
                    group: zone.group_key,
                });
            }
        }
        fn drop_id<K: std::hash::Hash + Eq>(
            map: &mut HashMap<K, Vec<ZoneId>>,
            key: &K,
            id: ZoneId,
        ) {
            if let Some(v) = map.get_mut(key) {
                v.retain(|z| *z != id);
                if v.is_empty() {
                    map.remove(key);
                }
            }
        }
        if let Some(s) = zone.subject_id {
            drop_id(&mut self.subject_standing, &s, id);
        }
        if let Some(g) = zone.group_key {
            drop_id(&mut self.group_standing, &g, id);
        }
        if let Some(dev) = zone.dynamic_device() {
            let dev = dev.to_string();
            drop_id(&mut self.dynamic_by_device, &dev, id);
            if !self.dynamic_by_device.contains_key(&dev) {
                self.peers
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&dev);
            }
        }
        true
    }

    /// Make `subject` a member of `group`: the group's zones apply to it.
    pub fn bind_group(&mut self, subject: SubjectId, group: &str) {
        let g = self.group_key(group.trim());
        self.generation = self.generation.wrapping_add(1);
        let groups = self.subject_groups.entry(subject).or_default();
        if !groups.contains(&g) {
            groups.push(g);
        }
        self.group_members.entry(g).or_default().insert(subject);
    }

    /// Remove `subject` from `group`.
    pub fn unbind_group(&mut self, subject: SubjectId, group: &str) {
        let Some(&g) = self.group_keys.get(group.trim()) else {
            return;
        };
        self.generation = self.generation.wrapping_add(1);
        if let Some(groups) = self.subject_groups.get_mut(&subject) {
            groups.retain(|x| *x != g);
            if groups.is_empty() {
                self.subject_groups.remove(&subject);
            }
        }
        if let Some(m) = self.group_members.get_mut(&g) {
            m.remove(&subject);
        }
    }

    fn groups_of_key(&self, subject: SubjectId) -> &[GroupKey] {
        self.subject_groups
            .get(&subject)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Whether `zone` applies to `subject` (its own zone, or a zone of one of its groups).
    pub fn applies_to(&self, zone: &Zone, subject: SubjectId) -> bool {
        zone.subject_id == Some(subject)
            || zone
                .group_key
                .is_some_and(|g| self.groups_of_key(subject).contains(&g))
    }

    /// Inclusion and dynamic zones that apply to `subject` (evaluated on every fix).
    pub fn standing_zones(&self, subject: SubjectId) -> impl Iterator<Item = &Zone> {
        let own = self.subject_standing.get(&subject).into_iter().flatten();
        let groups = self
            .groups_of_key(subject)
            .iter()
            .filter_map(|g| self.group_standing.get(g))
            .flatten();
        own.chain(groups).filter_map(|id| self.zones.get(id))
    }

    /// Calls `f` for every static zone applying to `subject` whose bounding box comes
    /// within `radius_m` of the point (R-tree candidates, no exact test).
    pub fn for_each_candidate<'a>(
        &'a self,
        subject: SubjectId,
        lon: f64,
        lat: f64,
        radius_m: f64,
        mut f: impl FnMut(&'a Zone),
    ) {
        let q = BBox::around(lon, lat, radius_m);
        let groups = self.groups_of_key(subject);
        let mut seen: [ZoneId; 8] = [0; 8];
        let mut n_seen = 0usize;
        let mut overflow: Vec<ZoneId> = Vec::new();
        for env in envelopes(&q) {
            for entry in self.tree.locate_in_envelope_intersecting(env) {
                let Some(zone) = self.zones.get(&entry.zone_id) else {
                    continue;
                };
                let applies = zone.subject_id == Some(subject)
                    || zone.group_key.is_some_and(|g| groups.contains(&g));
                if !applies {
                    continue;
                }
                // A zone can be reached through its antimeridian copy too: report it once.
                if seen[..n_seen].contains(&zone.id) || overflow.contains(&zone.id) {
                    continue;
                }
                if n_seen < seen.len() {
                    seen[n_seen] = zone.id;
                    n_seen += 1;
                } else {
                    overflow.push(zone.id);
                }
                f(zone);
            }
        }
    }

    /// Static zones applying to `subject` that contain `[lon, lat]` or whose boundary is
    /// within `radius_m` metres of it, using the R-tree; sorted by zone id.
    pub fn zones_for(
        &self,
        subject: SubjectId,
        lon: f64,
        lat: f64,
        radius_m: f64,
    ) -> Vec<ZoneMatch<'_>> {
        let mut out = Vec::new();
        self.for_each_candidate(subject, lon, lat, radius_m, |zone| {
            if let Some(d) = zone.signed_distance_m(lon, lat) {
                if d <= radius_m {
                    out.push(ZoneMatch {
                        zone,
                        signed_distance_m: d,
                    });
                }
            }
        });
        out.sort_by_key(|m| m.zone.id);
        out
    }

    /// Same answer as [`ZoneIndex::zones_for`] by testing every zone (no R-tree): the
    /// reference for tests and the baseline of the benchmark.
    pub fn zones_for_brute_force(
        &self,
        subject: SubjectId,
        lon: f64,
        lat: f64,
        radius_m: f64,
    ) -> Vec<ZoneMatch<'_>> {
        let mut out: Vec<ZoneMatch<'_>> = self
            .zones
            .values()
            .filter(|z| self.applies_to(z, subject))
            .filter_map(|zone| {
                let d = zone.signed_distance_m(lon, lat)?;
                (d <= radius_m).then_some(ZoneMatch {
                    zone,
                    signed_distance_m: d,
                })
            })
            .collect();
        out.sort_by_key(|m| m.zone.id);
        out
    }

    /// Whether any dynamic zone follows `device_id`.
    pub fn is_dynamic_source(&self, device_id: &str) -> bool {
        self.dynamic_by_device.contains_key(device_id)
    }

    /// Record the latest position of a device that dynamic zones follow (the victim's
    /// device). Needs only `&self`, so it works under a read guard. Returns the subjects
    /// whose dynamic zones follow this device, sorted; the pipeline then calls
    /// [`crate::SubjectMonitor::on_dynamic_update`] for each of them in its worker.
    ///
    /// Ignored (empty result): records without a valid, finite position; records whose device
    /// time is not trusted ([`Record::time_trusted`]: one fix dated 2099 must not become the
    /// victim's position for good); and positions not newer than the stored one (a repeated
    /// or buffered old fix does not move the zone back).
    pub fn update_dynamic(&self, record: &Record) -> Vec<SubjectId> {
        let device_id = record.device_id.as_str();
        let Some(zone_ids) = self.dynamic_by_device.get(device_id) else {
            return Vec::new();
        };
        let Some(position) = record.position.as_ref() else {
            return Vec::new();
        };
        if !record.time_trusted() {
            return Vec::new();
        }
        let at = record.device_time;
        let usable = position.valid
            && position.lat.is_finite()
            && position.lon.is_finite()
            && position.lat.abs() <= 90.0
            && position.lon.abs() <= 180.0;
        if !usable {
            return Vec::new();
        }
        {
            let mut peers = self.peers.write().unwrap_or_else(PoisonError::into_inner);
            if peers.get(device_id).is_some_and(|p| p.at >= at) {
                return Vec::new();
            }
            let accuracy_m = position
                .accuracy_m
                .map(f64::from)
                .filter(|a| a.is_finite() && *a >= 0.0)
                .unwrap_or(crate::monitor::ASSUMED_ACCURACY_M);
            peers.insert(
                device_id.to_string(),
                PeerFix {
                    lon: position.lon,
                    lat: position.lat,
                    accuracy_m,
                    at,
                },
            );
        }
        let mut out = BTreeSet::new();
        for zone in zone_ids.iter().filter_map(|id| self.zones.get(id)) {
            if let Some(s) = zone.subject_id {
                out.insert(s);
            }
            if let Some(members) = zone.group_key.and_then(|g| self.group_members.get(&g)) {
                out.extend(members.iter().copied());
            }
        }
        out.into_iter().collect()
    }

    /// The followed device's position if it is known and not older than the peer max age at `now`.
    pub fn peer_position(&self, device_id: &str, now: DateTime<Utc>) -> Option<PeerFix> {
        let peers = self.peers.read().unwrap_or_else(PoisonError::into_inner);
        let p = *peers.get(device_id)?;
        (now - p.at <= self.peer_max_age).then_some(p)
    }
}

/// The index shared by all ingest workers. Clone it into each worker; take
/// [`SharedZoneIndex::read`] per record or per batch, [`SharedZoneIndex::write`] for zone
/// edits and group bindings. Lock poisoning is ignored: no index operation leaves it
/// half-updated on panic paths (there are none by design).
#[derive(Debug, Clone, Default)]
pub struct SharedZoneIndex(Arc<RwLock<ZoneIndex>>);

impl SharedZoneIndex {
    pub fn new(index: ZoneIndex) -> Self {
        SharedZoneIndex(Arc::new(RwLock::new(index)))
    }

    pub fn read(&self) -> RwLockReadGuard<'_, ZoneIndex> {
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, ZoneIndex> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }
}
