//! Supervisor views: the curfew-compliance report and the audit log.

use std::collections::HashMap;

use super::Query;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Duration, Offset, Utc};
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
            "attachment; filename=\"{}\"",
            period_file_name(&q, from, to)
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

/// The report's file name names the days it covers as the caller gave them: the first day and
/// the last day the (exclusive) end still covers, in the UTC offset of the query's times (UTC
/// when they have none). A week asked as 23 Nov 00:00+01:00 to 1 Dec 00:00+01:00 is
/// `curfew-20261123-20261130.csv`, not the UTC dates 22 Nov and 1 Dec.
fn period_file_name(q: &Params, from: DateTime<Utc>, to: DateTime<Utc>) -> String {
    let offset_of = |field: &str| {
        q.get(field)
            .and_then(|raw| DateTime::parse_from_rfc3339(raw.trim()).ok())
            .map(|t| *t.offset())
    };
    let to_offset = offset_of("to")
        .or_else(|| offset_of("from"))
        .unwrap_or(Utc.fix());
    let from_offset = offset_of("from").unwrap_or(to_offset);
    let first = from.with_timezone(&from_offset).date_naive();
    let last = (to - Duration::nanoseconds(1))
        .with_timezone(&to_offset)
        .date_naive()
        .max(first);
    format!(
        "curfew-{}-{}.csv",
        first.format("%Y%m%d"),
        last.format("%Y%m%d")
    )
}

/// Largest page of the audit view; a CSV export may take more.
const AUDIT_PAGE_MAX: i64 = 5000;
/// Largest CSV export of the audit log in one request.
const AUDIT_EXPORT_MAX: i64 = 100_000;

/// `GET /api/audit`: the audit log, newest first, filtered in the database (actor, subject,
/// target type, action prefix, time window), paged with `limit` and `before_id` (the last id
/// of the previous page; `offset` also works but shifts as new rows arrive), as JSON or (with
/// `format=csv`) a CSV export. Every view and export is itself audited.
pub(crate) async fn audit(
    State(st): State<AppState>,
    me: CurrentUser,
    Query(q): Query<Params>,
) -> ApiResult<Response> {
    st.require_role(&me, &[Role::Supervisor, Role::Admin], "audit.view", "audit")
        .await?;
    let format = q.get("format").map(|s| s.as_str()).unwrap_or("json");
    if format != "json" && format != "csv" {
        return Err(ApiError::field("format", "must be json or csv"));
    }
    let max = if format == "csv" {
        AUDIT_EXPORT_MAX
    } else {
        AUDIT_PAGE_MAX
    };
    let limit = int_param(&q, "limit")?.unwrap_or(if format == "csv" { max } else { 200 });
    if !(1..=max).contains(&limit) {
        return Err(ApiError::field("limit", format!("must be 1..{max}")));
    }
    let offset = int_param(&q, "offset")?.unwrap_or(0);
    if offset < 0 {
        return Err(ApiError::field("offset", "must be >= 0"));
    }
    let mut actor_id = int_param(&q, "actor_id")?;
    if let Some(name) = q.get("actor").map(|s| s.trim()).filter(|s| !s.is_empty()) {
        match st.inner.store.get_user_by_name(name).await? {
            Some(u) => actor_id = Some(u.id),
            None => return Err(ApiError::field("actor", "no such user")),
        }
    }
    let filter = AuditFilter {
        actor_id,
        subject_id: int_param(&q, "subject_id")?,
        target_type: q
            .get("target_type")
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty()),
        since: time_param(&q, "since")?,
        until: time_param(&q, "until")?,
        action: q
            .get("action")
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty()),
        limit: Some(limit),
        offset: Some(offset),
        before_id: int_param(&q, "before_id")?,
    };
    let entries = st.inner.store.list_audit(&filter).await?;
    st.audit(
        &me,
        if format == "csv" {
            "audit.export"
        } else {
            "audit.view"
        },
        "audit",
        None,
        filter.subject_id,
        json!({ "filter": filter, "count": entries.len() }),
    )
    .await?;
    if format == "csv" {
        let body = audit_csv(&entries).map_err(|e| ApiError::Internal(e.to_string()))?;
        let name = format!(
            "attachment; filename=\"audit-{}.csv\"",
            Utc::now().format("%Y%m%dT%H%M%SZ")
        );
        return Ok((
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
                (header::CONTENT_DISPOSITION, name),
            ],
            body,
        )
            .into_response());
    }
    Ok(Json(entries).into_response())
}

/// The audit rows as CSV (details as compact JSON in one column).
fn audit_csv(entries: &[AuditEntry]) -> Result<String, csv::Error> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "id",
        "at",
        "actor_id",
        "actor",
        "action",
        "target_type",
        "target_id",
        "subject_id",
        "details",
    ])?;
    for e in entries {
        w.write_record([
            e.id.to_string(),
            e.at.to_rfc3339(),
            e.actor_id.map(|v| v.to_string()).unwrap_or_default(),
            e.actor.clone(),
            e.action.clone(),
            e.target_type.clone(),
            e.target_id.clone().unwrap_or_default(),
            e.subject_id.map(|v| v.to_string()).unwrap_or_default(),
            e.details.to_string(),
        ])?;
    }
    let bytes = w.into_inner().map_err(|e| e.into_error())?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}
