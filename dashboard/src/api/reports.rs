//! Supervisor views: the curfew-compliance report and the audit log.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{Duration, Utc};
use em_model::{AuditEntry, Role};
use em_store::{AlertFilter, AuditFilter};
use serde_json::json;

use super::{int_param, period, time_param, Params};
use crate::auth::CurrentUser;
use crate::curfew::{self, CurfewReport};
use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// Longest report period.
const MAX_REPORT_DAYS: i64 = 366;
/// Alerts that started this long before the period are still looked at (they may overlap it).
const LOOKBACK_DAYS: i64 = 31;

pub(crate) async fn curfew(
    State(st): State<AppState>,
    me: CurrentUser,
    Query(q): Query<Params>,
) -> ApiResult<Response> {
    st.require_role(
        &me,
        &[Role::Supervisor, Role::Admin],
        "report.curfew",
        "report",
    )
    .await?;
    let (from, to) = period(&q, Duration::days(7), Duration::days(MAX_REPORT_DAYS))?;
    let format = q.get("format").map(String::as_str).unwrap_or("json");
    if format != "json" && format != "csv" {
        return Err(ApiError::field("format", "must be json or csv"));
    }
    let officer_filter = int_param(&q, "officer_id")?;
    let subject_filter = int_param(&q, "subject_id")?;
    let now = Utc::now();
    let store = &st.inner.store;
    let names: HashMap<i64, String> = store
        .list_users()
        .await?
        .into_iter()
        .map(|u| (u.id, u.display_name))
        .collect();
    let subjects = store.list_subjects(officer_filter).await?;
    let mut rows = Vec::new();
    for s in subjects
        .iter()
        .filter(|s| subject_filter.is_none() || subject_filter == Some(s.id))
    {
        let zones = store.list_zones(Some(s.id)).await?;
        let alerts = store
            .list_alerts(&AlertFilter {
                subject_ids: Some(vec![s.id]),
                states: None,
                since: Some(from - Duration::days(LOOKBACK_DAYS)),
                limit: Some(100_000),
            })
            .await?;
        let officer = s.officer_id.and_then(|o| names.get(&o).cloned());
        rows.push(curfew::subject_report(
            s, officer, &zones, &alerts, from, to, now,
        ));
    }
    let report = CurfewReport {
        from,
        to,
        generated_at: now,
        officers: curfew::officer_rollup(&rows),
        subjects: rows,
    };
    st.audit(
        &me,
        "report.curfew",
        "report",
        None,
        subject_filter,
        json!({ "from": from, "to": to, "format": format, "officer_id": officer_filter,
                "subject_ids": report.subjects.iter().map(|s| s.subject_id).collect::<Vec<_>>() }),
    )
    .await?;
    if format == "csv" {
        let body = curfew::to_csv(&report).map_err(|e| ApiError::Internal(e.to_string()))?;
        let filename = format!(
            "attachment; filename=\"curfew-{}-{}.csv\"",
            from.format("%Y%m%d"),
            to.format("%Y%m%d")
        );
        return Ok((
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
                (header::CONTENT_DISPOSITION, filename),
            ],
            body,
        )
            .into_response());
    }
    Ok(Json(report).into_response())
}

pub(crate) async fn audit(
    State(st): State<AppState>,
    me: CurrentUser,
    Query(q): Query<Params>,
) -> ApiResult<Json<Vec<AuditEntry>>> {
    st.require_role(&me, &[Role::Supervisor, Role::Admin], "audit.view", "audit")
        .await?;
    let limit = int_param(&q, "limit")?.unwrap_or(200);
    if !(1..=5000).contains(&limit) {
        return Err(ApiError::field("limit", "must be 1..5000"));
    }
    let mut actor_id = int_param(&q, "actor_id")?;
    if let Some(name) = q.get("actor").map(|s| s.trim()).filter(|s| !s.is_empty()) {
        match st.inner.store.get_user_by_name(name).await? {
            Some(u) => actor_id = Some(u.id),
            None => return Err(ApiError::field("actor", "no such user")),
        }
    }
    let action = q
        .get("action")
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    let filter = AuditFilter {
        actor_id,
        subject_id: int_param(&q, "subject_id")?,
        target_type: q
            .get("target_type")
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty()),
        since: time_param(&q, "since")?,
        until: time_param(&q, "until")?,
        // The action filter is applied here, so fetch more to fill the page.
        limit: Some(if action.is_some() { 5000 } else { limit }),
    };
    let mut entries = st.inner.store.list_audit(&filter).await?;
    if let Some(a) = &action {
        entries.retain(|e| e.action.starts_with(a.as_str()));
    }
    entries.truncate(usize::try_from(limit).unwrap_or(200));
    st.audit(
        &me,
        "audit.view",
        "audit",
        None,
        filter.subject_id,
        json!({ "filter": filter, "action": action, "count": entries.len() }),
    )
    .await?;
    Ok(Json(entries))
}
