//! Victim data: a protected person's device positions (its own class, read only by supervisors
//! and victim liaison officers, every read audited) and the class of a device.

use super::{Path, Query};
use axum::extract::State;
use axum::Json;
use chrono::Duration;
use em_model::{DeviceClass, Role};
use serde_json::{json, Value};

use super::{int_param, period, JsonBody, Params};
use crate::auth::CurrentUser;
use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// Longest period of one victim-position read.
const MAX_VICTIM_DAYS: i64 = 31;
/// Most points returned by one read.
const MAX_VICTIM_POINTS: i64 = 10_000;

/// `GET /api/victim-devices/{id}/positions?from&to&limit`: positions of a protected person's
/// device. Supervisors and victim liaison officers only (others: 403 + `access.denied`); the read
/// is audited as `victim.positions.view`.
pub(crate) async fn positions(
    State(st): State<AppState>,
    me: CurrentUser,
    Path(device_id): Path<String>,
    Query(q): Query<Params>,
) -> ApiResult<Json<Value>> {
    if !me.role().may_read_victim_data() {
        return Err(st
            .deny_because(
                &me,
                "victim.positions.view",
                "victim_device",
                Some(device_id),
                None,
                "victim positions are shown to supervisors and victim liaison officers only",
            )
            .await);
    }
    let store = &st.inner.store;
    match store.get_device(&device_id).await? {
        Some(d) if d.class == DeviceClass::Victim => {}
        _ => return Err(ApiError::NotFound(format!("victim device {device_id}"))),
    }
    let (from, to) = period(&q, Duration::hours(24), Duration::days(MAX_VICTIM_DAYS))?;
    let limit = int_param(&q, "limit")?.unwrap_or(1000);
    if !(1..=MAX_VICTIM_POINTS).contains(&limit) {
        return Err(ApiError::field(
            "limit",
            format!("must be 1..{MAX_VICTIM_POINTS}"),
        ));
    }
    let points = store.victim_positions(&device_id, from, to, limit).await?;
    st.audit(
        &me,
        "victim.positions.view",
        "victim_device",
        Some(device_id.clone()),
        None,
        json!({ "from": from, "to": to, "points": points.len() }),
    )
    .await?;
    let truncated = points.len() as i64 >= limit;
    Ok(Json(json!({
        "device_id": device_id, "from": from, "to": to, "truncated": truncated, "points": points,
    })))
}

/// `PUT /api/devices/{id}/class` `{"class": "victim" | "offender_tag"}`: admins and supervisors.
/// A device worn by a subject cannot become a victim device; a device a dynamic zone follows
/// cannot stop being one (its records would reach offender data). Audited as `device.class`.
pub(crate) async fn set_class(
    State(st): State<AppState>,
    me: CurrentUser,
    Path(device_id): Path<String>,
    JsonBody(input): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    st.require_role(
        &me,
        &[Role::Admin, Role::Supervisor],
        "device.class",
        "device",
    )
    .await?;
    let class = match input.get("class").and_then(Value::as_str) {
        Some(c) => c
            .parse::<DeviceClass>()
            .map_err(|e| ApiError::field("class", e))?,
        None => {
            return Err(ApiError::field(
                "class",
                "is required (\"victim\" or \"offender_tag\")",
            ))
        }
    };
    let store = &st.inner.store;
    let Some(device) = store.get_device(&device_id).await? else {
        return Err(ApiError::NotFound(format!("device {device_id}")));
    };
    match class {
        DeviceClass::Victim => {
            if store
                .current_assignments()
                .await?
                .iter()
                .any(|a| a.device_id == device_id)
            {
                return Err(ApiError::field(
                    "class",
                    "the device is worn by a subject: unassign it first",
                ));
            }
        }
        DeviceClass::OffenderTag => {
            let followed = store
                .list_zones(None)
                .await?
                .into_iter()
                .find(|z| z.dynamic_device() == Some(device_id.as_str()));
            if let Some(z) = followed {
                return Err(ApiError::field(
                    "class",
                    format!(
                        "dynamic zone {} follows this device: remove that zone first",
                        z.id
                    ),
                ));
            }
        }
    }
    let before = device.class;
    if before != class {
        store
            .upsert_device(&em_model::Device { class, ..device })
            .await?;
    }
    st.audit(
        &me,
        "device.class",
        "device",
        Some(device_id.clone()),
        None,
        json!({ "before": before, "after": class }),
    )
    .await?;
    Ok(Json(json!({ "device_id": device_id, "class": class })))
}
