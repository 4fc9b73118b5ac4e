//! Subjects, trails, zones and the map.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::{Path, Query};
use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Duration, Utc};
use em_geofence::{CompiledGeometry, CompiledSchedule, GeofenceError};
use em_model::{
    AlertState, BreachRules, DeviceClass, Role, Subject, SubjectId, ZoneGeometry, ZoneId, ZoneKind,
    ZoneSpec,
};
use em_store::AlertFilter;
use serde::Serialize;
use serde_json::{json, Value};

use super::{int_param, period, JsonBody, Params};
use crate::auth::CurrentUser;
use crate::error::{ApiError, ApiResult, FieldErrors};
use crate::zone_input::{parse_zone, ZoneDraft};
use crate::AppState;

#[derive(Debug, Serialize)]
pub(crate) struct SubjectSummary {
    #[serde(flatten)]
    subject: Subject,
    officer_name: Option<String>,
    latest: Option<em_store::LatestState>,
    open_alerts: usize,
    max_severity: Option<em_model::Severity>,
}

async fn officer_names(st: &AppState) -> ApiResult<HashMap<i64, String>> {
    Ok(st
        .inner
        .store
        .list_users()
        .await?
        .into_iter()
        .map(|u| (u.id, u.display_name))
        .collect())
}

pub(crate) async fn list(
    State(st): State<AppState>,
    me: CurrentUser,
) -> ApiResult<Json<Vec<SubjectSummary>>> {
    let subjects = st.visible_subjects(&me).await?;
    let ids: Vec<SubjectId> = subjects.iter().map(|s| s.id).collect();
    let latest: HashMap<SubjectId, em_store::LatestState> = st
        .inner
        .store
        .latest_states(Some(&ids))
        .await?
        .into_iter()
        .map(|l| (l.subject_id, l))
        .collect();
    let alerts = if ids.is_empty() {
        Vec::new()
    } else {
        st.inner
            .store
            .list_alerts(&AlertFilter {
                subject_ids: Some(ids.clone()),
                states: Some(vec![AlertState::Open, AlertState::Acknowledged]),
                since: None,
                limit: Some(10_000),
            })
            .await?
    };
    let names = officer_names(&st).await?;
    st.audit(
        &me,
        "subject.list",
        "subject",
        None,
        None,
        json!({ "subject_ids": ids }),
    )
    .await?;
    let mut latest = latest;
    let out = subjects
        .into_iter()
        .map(|s| {
            let own: Vec<_> = alerts.iter().filter(|a| a.subject_id == s.id).collect();
            SubjectSummary {
                officer_name: s.officer_id.and_then(|o| names.get(&o).cloned()),
                latest: latest.remove(&s.id),
                open_alerts: own.len(),
                max_severity: own.iter().map(|a| a.severity).max(),
                subject: s,
            }
        })
        .collect();
    Ok(Json(out))
}

fn str_field(
    obj: &serde_json::Map<String, Value>,
    field: &str,
    max: usize,
    errors: &mut FieldErrors,
) -> Option<String> {
    match obj.get(field).and_then(Value::as_str).map(str::trim) {
        Some(s) if !s.is_empty() && s.chars().count() <= max => Some(s.to_string()),
        Some(s) if !s.is_empty() => {
            errors.insert(field.into(), format!("must be at most {max} characters"));
            None
        }
        _ => {
            errors.insert(field.into(), "is required".into());
            None
        }
    }
}

fn time_field(
    obj: &serde_json::Map<String, Value>,
    field: &str,
    errors: &mut FieldErrors,
) -> Option<DateTime<Utc>> {
    match obj.get(field) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(Value::String(s)) => match DateTime::parse_from_rfc3339(s.trim()) {
            Ok(t) => Some(t.with_timezone(&Utc)),
            Err(_) => {
                errors.insert(
                    field.into(),
                    "must be a date-time like 2024-05-01T00:00:00Z".into(),
                );
                None
            }
        },
        Some(_) => {
            errors.insert(field.into(), "must be a date-time string".into());
            None
        }
    }
}

fn rules_field(v: Option<&Value>, errors: &mut FieldErrors) -> BreachRules {
    let d = BreachRules::default();
    let Some(obj) = v.and_then(Value::as_object) else {
        if v.is_some_and(|v| !v.is_null()) {
            errors.insert("rules".into(), "must be an object".into());
        }
        return d;
    };
    let mut num = |name: &str, lo: f64, hi: f64, default: f64| -> f64 {
        match obj.get(name) {
            None | Some(Value::Null) => default,
            Some(x) => match x.as_f64() {
                Some(n) if n.is_finite() && (lo..=hi).contains(&n) => n,
                _ => {
                    errors.insert(
                        format!("rules.{name}"),
                        format!("must be a number {lo}..{hi}"),
                    );
                    default
                }
            },
        }
    };
    BreachRules {
        buffer_m: num("buffer_m", 0.0, 1000.0, d.buffer_m),
        consecutive_fixes: num("consecutive_fixes", 1.0, 100.0, d.consecutive_fixes as f64) as u32,
        persist_secs: num("persist_secs", 0.0, 86_400.0, d.persist_secs as f64) as u32,
        no_fix_secs: num("no_fix_secs", 60.0, 86_400.0, d.no_fix_secs as f64) as u32,
    }
}

/// Validate subject input (create or update) into a `Subject` with `id`.
async fn parse_subject(st: &AppState, id: SubjectId, input: &Value) -> ApiResult<Subject> {
    let mut errors = FieldErrors::new();
    let Some(obj) = input.as_object() else {
        return Err(ApiError::field("_", "expected a JSON object"));
    };
    let reference = str_field(obj, "reference", 64, &mut errors);
    if let Some(r) = &reference {
        // A case reference names one subject in the OMS: two subjects with the same one would
        // send the OMS alerts it cannot tell apart.
        let taken = st
            .inner
            .store
            .list_subjects(None)
            .await?
            .into_iter()
            .any(|s| s.id != id && s.reference.trim().eq_ignore_ascii_case(r.trim()));
        if taken {
            errors.insert(
                "reference".into(),
                "is already the case reference of another subject".into(),
            );
        }
    }
    let display_name = str_field(obj, "display_name", 100, &mut errors);
    let timezone = str_field(obj, "timezone", 64, &mut errors);
    if let Some(tz) = &timezone {
        if em_geofence::parse_timezone(tz).is_err() {
            errors.insert(
                "timezone".into(),
                "must be an IANA time zone such as Europe/Copenhagen".into(),
            );
        }
    }
    let officer_id = match obj.get("officer_id") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_i64() {
            Some(oid) => match st.inner.store.get_user(oid).await? {
                Some(u) if u.active && u.role == Role::Officer => Some(oid),
                _ => {
                    errors.insert("officer_id".into(), "must be an active officer".into());
                    None
                }
            },
            None => {
                errors.insert("officer_id".into(), "must be a user id".into());
                None
            }
        },
    };
    let order_start = time_field(obj, "order_start", &mut errors);
    let order_end = time_field(obj, "order_end", &mut errors);
    if let (Some(s), Some(e)) = (order_start, order_end) {
        if e <= s {
            errors.insert("order_end".into(), "must be after the order start".into());
        }
    }
    let rules = rules_field(obj.get("rules"), &mut errors);
    match (reference, display_name, timezone) {
        (Some(reference), Some(display_name), Some(timezone)) if errors.is_empty() => Ok(Subject {
            id,
            reference,
            display_name,
            officer_id,
            timezone,
            order_start,
            order_end,
            rules,
        }),
        _ => Err(ApiError::Validation(errors)),
    }
}

pub(crate) async fn create(
    State(st): State<AppState>,
    me: CurrentUser,
    JsonBody(input): JsonBody<Value>,
) -> ApiResult<Json<Subject>> {
    st.require_role(
        &me,
        &[Role::Supervisor, Role::Admin],
        "subject.create",
        "subject",
    )
    .await?;
    let subject = parse_subject(&st, 0, &input).await?;
    let id = st.inner.store.upsert_subject(&subject).await?;
    let subject = Subject { id, ..subject };
    st.audit(
        &me,
        "subject.create",
        "subject",
        Some(id.to_string()),
        Some(id),
        json!({ "after": subject }),
    )
    .await?;
    Ok(Json(subject))
}

pub(crate) async fn update(
    State(st): State<AppState>,
    me: CurrentUser,
    Path(id): Path<SubjectId>,
    JsonBody(input): JsonBody<Value>,
) -> ApiResult<Json<Subject>> {
    st.require_role(
        &me,
        &[Role::Supervisor, Role::Admin],
        "subject.update",
        "subject",
    )
    .await?;
    let before = st.subject_for(&me, id, "subject.update").await?;
    let subject = parse_subject(&st, id, &input).await?;
    st.inner.store.upsert_subject(&subject).await?;
    st.audit(
        &me,
        "subject.update",
        "subject",
        Some(id.to_string()),
        Some(id),
        json!({ "before": before, "after": subject }),
    )
    .await?;
    Ok(Json(subject))
}

pub(crate) async fn detail(
    State(st): State<AppState>,
    me: CurrentUser,
    Path(id): Path<SubjectId>,
) -> ApiResult<Json<Value>> {
    let subject = st.subject_for(&me, id, "subject.view").await?;
    let store = &st.inner.store;
    let latest = store
        .latest_states(Some(&[id]))
        .await?
        .into_iter()
        .find(|l| l.subject_id == id);
    let zones = store.list_zones(Some(id)).await?;
    let devices: Vec<_> = store
        .current_assignments()
        .await?
        .into_iter()
        .filter(|a| a.subject_id == id)
        .collect();
    let mut alerts = store
        .list_alerts(&AlertFilter {
            subject_ids: Some(vec![id]),
            states: None,
            since: None,
            limit: Some(50),
        })
        .await?;
    super::alerts::sort_alerts(&mut alerts);
    let officer = match subject.officer_id {
        Some(oid) => store
            .get_user(oid)
            .await?
            .map(|u| json!({ "id": u.id, "display_name": u.display_name })),
        None => None,
    };
    st.audit(
        &me,
        "subject.view",
        "subject",
        Some(id.to_string()),
        Some(id),
        json!({}),
    )
    .await?;
    Ok(Json(json!({
        "subject": subject,
        "officer": officer,
        "latest": latest,
        "zones": zones,
        "devices": devices,
        "alerts": alerts,
    })))
}

/// Longest trail period served at once.
const MAX_TRAIL_DAYS: i64 = 31;
const MAX_TRAIL_POINTS: i64 = 50_000;

pub(crate) async fn trail(
    State(st): State<AppState>,
    me: CurrentUser,
    Path(id): Path<SubjectId>,
    Query(q): Query<Params>,
) -> ApiResult<Json<Value>> {
    st.subject_for(&me, id, "subject.trail").await?;
    let (from, to) = period(&q, Duration::hours(24), Duration::days(MAX_TRAIL_DAYS))?;
    let limit = int_param(&q, "limit")?.unwrap_or(10_000);
    if !(1..=MAX_TRAIL_POINTS).contains(&limit) {
        return Err(ApiError::field(
            "limit",
            format!("must be 1..{MAX_TRAIL_POINTS}"),
        ));
    }
    let points = st.inner.store.trail(id, from, to, limit).await?;
    st.audit(
        &me,
        "subject.trail",
        "subject",
        Some(id.to_string()),
        Some(id),
        json!({ "from": from, "to": to, "points": points.len() }),
    )
    .await?;
    let truncated = points.len() as i64 >= limit;
    Ok(Json(json!({
        "subject_id": id, "from": from, "to": to, "truncated": truncated, "points": points,
    })))
}

pub(crate) async fn zones(
    State(st): State<AppState>,
    me: CurrentUser,
    Path(id): Path<SubjectId>,
) -> ApiResult<Json<Vec<ZoneSpec>>> {
    st.subject_for(&me, id, "zone.list").await?;
    let zones = st.inner.store.list_zones(Some(id)).await?;
    st.audit(
        &me,
        "zone.list",
        "zone",
        None,
        Some(id),
        json!({ "zone_ids": zones.iter().map(|z| z.id).collect::<Vec<_>>() }),
    )
    .await?;
    Ok(Json(zones))
}

/// Field that a geofence-engine rejection of the geometry belongs to.
fn geometry_error_field(geometry: &ZoneGeometry, e: &GeofenceError) -> &'static str {
    match (geometry, e) {
        (_, GeofenceError::InvalidRadius { .. }) => "radius_m",
        (ZoneGeometry::Circle { .. }, _) => "center",
        (ZoneGeometry::Dynamic { .. }, _) => "device_id",
        _ => "coordinates",
    }
}

/// Second line of validation: the geofence engine must accept what it will have to evaluate.
fn engine_check(draft: &ZoneDraft) -> ApiResult<()> {
    let mut errors = FieldErrors::new();
    if let Err(e) = CompiledGeometry::compile(0, &draft.geometry) {
        let msg = e.to_string();
        let msg = msg.strip_prefix("zone 0: ").unwrap_or(&msg).to_string();
        errors.insert(geometry_error_field(&draft.geometry, &e).into(), msg);
    }
    if let Some(schedule) = &draft.schedule {
        if let Err(e) = CompiledSchedule::compile(schedule) {
            errors.insert("windows".into(), e.to_string());
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Validation(errors))
    }
}

/// An exclusion zone must not cover the subject's curfew home (nor a curfew home lie in one of
/// their exclusion zones): the order could not be kept, and every night at home would raise
/// a breach.
async fn check_home_not_excluded(
    st: &AppState,
    subject: SubjectId,
    zone_id: Option<ZoneId>,
    d: &ZoneDraft,
) -> ApiResult<()> {
    let is_exclusion = d.kind == ZoneKind::Exclusion;
    if !is_exclusion && !d.is_curfew_home {
        return Ok(());
    }
    for other in st.inner.store.list_zones(Some(subject)).await? {
        if Some(other.id) == zone_id || other.subject_id != Some(subject) {
            continue;
        }
        let clash = (is_exclusion && other.is_curfew_home)
            || (d.is_curfew_home && other.kind == ZoneKind::Exclusion);
        if clash && crate::zone_input::geometries_overlap(&d.geometry, &other.geometry) {
            return Err(ApiError::field(
                "kind",
                format!(
                    "an exclusion zone may not overlap the subject's curfew home ({:?}, zone {})",
                    other.name, other.id
                ),
            ));
        }
    }
    Ok(())
}

fn draft(input: &Value) -> ApiResult<ZoneDraft> {
    let d = parse_zone(input).map_err(ApiError::Validation)?;
    engine_check(&d)?;
    Ok(d)
}

/// Why only a supervisor may touch a dynamic zone (recorded with the denial).
const DYNAMIC_ZONE_RULE: &str =
    "dynamic (victim-protection) zones are created, changed and removed by supervisors only";

/// A dynamic (victim-protection) zone — before or after the change — may be created, changed or
/// removed by a supervisor only: anyone else gets 403 and an `access.denied` record with the
/// reason. An officer can thus neither delete, overwrite, re-shape nor detach one.
async fn check_dynamic_change(
    st: &AppState,
    me: &CurrentUser,
    zone_id: Option<ZoneId>,
    subject_id: Option<SubjectId>,
    touched: [Option<&ZoneGeometry>; 2],
    attempted: &str,
) -> ApiResult<()> {
    let dynamic = touched
        .iter()
        .any(|g| matches!(g, Some(ZoneGeometry::Dynamic { .. })));
    if !dynamic || me.role() == Role::Supervisor {
        return Ok(());
    }
    Err(st
        .deny_because(
            me,
            attempted,
            "zone",
            zone_id.map(|z| z.to_string()),
            subject_id,
            DYNAMIC_ZONE_RULE,
        )
        .await)
}

/// The device a dynamic zone is to follow must be registered and worn by no subject; it becomes
/// a victim device (its records go to the victim store from now on), audited as `device.class`.
async fn adopt_victim_device(
    st: &AppState,
    me: &CurrentUser,
    geometry: &ZoneGeometry,
    subject_id: SubjectId,
) -> ApiResult<()> {
    let ZoneGeometry::Dynamic { device_id, .. } = geometry else {
        return Ok(());
    };
    let store = &st.inner.store;
    let Some(device) = store.get_device(device_id).await? else {
        return Err(ApiError::field(
            "device_id",
            "no such device: register the protected person's device first",
        ));
    };
    if store
        .current_assignments()
        .await?
        .iter()
        .any(|a| a.device_id == *device_id)
    {
        return Err(ApiError::field(
            "device_id",
            "this device is worn by a subject; a protected person's device cannot be assigned",
        ));
    }
    if device.class != DeviceClass::Victim {
        let before = device.class;
        store
            .upsert_device(&em_model::Device {
                class: DeviceClass::Victim,
                ..device
            })
            .await?;
        st.audit(
            me,
            "device.class",
            "device",
            Some(device_id.clone()),
            Some(subject_id),
            json!({ "before": before, "after": DeviceClass::Victim,
                    "reason": "followed by a dynamic (victim-protection) zone" }),
        )
        .await?;
    }
    Ok(())
}

pub(crate) async fn create_zone(
    State(st): State<AppState>,
    me: CurrentUser,
    Path(id): Path<SubjectId>,
    JsonBody(input): JsonBody<Value>,
) -> ApiResult<Json<ZoneSpec>> {
    st.subject_for(&me, id, "zone.create").await?;
    let d = draft(&input)?;
    check_dynamic_change(
        &st,
        &me,
        None,
        Some(id),
        [Some(&d.geometry), None],
        "zone.create",
    )
    .await?;
    adopt_victim_device(&st, &me, &d.geometry, id).await?;
    check_home_not_excluded(&st, id, None, &d).await?;
    let zone = ZoneSpec {
        id: 0,
        subject_id: Some(id),
        group: None,
        name: d.name,
        kind: d.kind,
        geometry: d.geometry,
        schedule: d.schedule,
        is_curfew_home: d.is_curfew_home,
    };
    let zone_id = st.inner.store.upsert_zone(&zone).await?;
    let zone = ZoneSpec {
        id: zone_id,
        ..zone
    };
    st.audit(
        &me,
        "zone.create",
        "zone",
        Some(zone_id.to_string()),
        Some(id),
        json!({ "after": zone }),
    )
    .await?;
    Ok(Json(zone))
}

/// Load a zone for `me`; unknown ids are 404 for supervisors/admins, 403 for officers.
async fn zone_for(
    st: &AppState,
    me: &CurrentUser,
    id: ZoneId,
    write: bool,
    attempted: &str,
) -> ApiResult<ZoneSpec> {
    match st.inner.store.get_zone(id).await? {
        Some(z) => {
            st.check_zone_access(me, &z, write, attempted).await?;
            Ok(z)
        }
        None if !AppState::caseload_only(me) => Err(ApiError::NotFound(format!("zone {id}"))),
        None => Err(st
            .deny(me, attempted, "zone", Some(id.to_string()), None)
            .await),
    }
}

pub(crate) async fn get_zone(
    State(st): State<AppState>,
    me: CurrentUser,
    Path(id): Path<ZoneId>,
) -> ApiResult<Json<ZoneSpec>> {
    let zone = zone_for(&st, &me, id, false, "zone.view").await?;
    st.audit(
        &me,
        "zone.view",
        "zone",
        Some(id.to_string()),
        zone.subject_id,
        json!({}),
    )
    .await?;
    Ok(Json(zone))
}

pub(crate) async fn update_zone(
    State(st): State<AppState>,
    me: CurrentUser,
    Path(id): Path<ZoneId>,
    JsonBody(input): JsonBody<Value>,
) -> ApiResult<Json<ZoneSpec>> {
    let before = zone_for(&st, &me, id, true, "zone.update").await?;
    if matches!(before.geometry, ZoneGeometry::Dynamic { .. }) {
        // Refused before the input is even looked at: no overwrite of any field.
        check_dynamic_change(
            &st,
            &me,
            Some(id),
            before.subject_id,
            [Some(&before.geometry), None],
            "zone.update",
        )
        .await?;
    }
    let d = draft(&input)?;
    check_dynamic_change(
        &st,
        &me,
        Some(id),
        before.subject_id,
        [Some(&before.geometry), Some(&d.geometry)],
        "zone.update",
    )
    .await?;
    if let Some(sid) = before.subject_id {
        adopt_victim_device(&st, &me, &d.geometry, sid).await?;
        check_home_not_excluded(&st, sid, Some(id), &d).await?;
    } else if matches!(d.geometry, ZoneGeometry::Dynamic { .. }) {
        return Err(ApiError::field(
            "shape",
            "a group zone cannot be dynamic (a protection zone belongs to one subject)",
        ));
    }
    let zone = ZoneSpec {
        id,
        subject_id: before.subject_id,
        group: before.group.clone(),
        name: d.name,
        kind: d.kind,
        geometry: d.geometry,
        schedule: d.schedule,
        is_curfew_home: d.is_curfew_home,
    };
    st.inner.store.upsert_zone(&zone).await?;
    st.audit(
        &me,
        "zone.update",
        "zone",
        Some(id.to_string()),
        zone.subject_id,
        json!({ "before": before, "after": zone }),
    )
    .await?;
    Ok(Json(zone))
}

pub(crate) async fn delete_zone(
    State(st): State<AppState>,
    me: CurrentUser,
    Path(id): Path<ZoneId>,
) -> ApiResult<Json<Value>> {
    let before = zone_for(&st, &me, id, true, "zone.delete").await?;
    check_dynamic_change(
        &st,
        &me,
        Some(id),
        before.subject_id,
        [Some(&before.geometry), None],
        "zone.delete",
    )
    .await?;
    st.inner.store.delete_zone(id).await?;
    st.audit(
        &me,
        "zone.delete",
        "zone",
        Some(id.to_string()),
        before.subject_id,
        json!({ "before": before }),
    )
    .await?;
    Ok(Json(json!({ "deleted": id })))
}

pub(crate) async fn map(State(st): State<AppState>, me: CurrentUser) -> ApiResult<Json<Value>> {
    let subjects = st.visible_subjects(&me).await?;
    let ids: Vec<SubjectId> = subjects.iter().map(|s| s.id).collect();
    let latest = st.inner.store.latest_states(Some(&ids)).await?;
    let mut seen = HashSet::new();
    let mut zones = Vec::new();
    for id in &ids {
        for z in st.inner.store.list_zones(Some(*id)).await? {
            if seen.insert(z.id) {
                zones.push(z);
            }
        }
    }
    st.audit(
        &me,
        "map.view",
        "subject",
        None,
        None,
        json!({ "subject_ids": ids }),
    )
    .await?;
    let names: BTreeMap<SubjectId, (String, String)> = subjects
        .into_iter()
        .map(|s| (s.id, (s.display_name, s.reference)))
        .collect();
    let positions: Vec<Value> = latest
        .into_iter()
        .map(|l| {
            let (name, reference) = names.get(&l.subject_id).cloned().unwrap_or_default();
            json!({ "subject_id": l.subject_id, "display_name": name, "reference": reference, "latest": l })
        })
        .collect();
    Ok(Json(json!({
        "subjects": names.iter().map(|(id, (n, r))| json!({"id": id, "display_name": n, "reference": r})).collect::<Vec<_>>(),
        "positions": positions,
        "zones": zones,
        "tile_url": st.settings.tile_url,
    })))
}
