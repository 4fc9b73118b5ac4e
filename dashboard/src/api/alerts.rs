//! The alert queue: listing, acknowledge, resolve, and the live SSE feed filtered by caseload.

use std::convert::Infallible;
use std::time::Duration;

use super::{Path, Query};
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Json;
use em_alerts::{AlertNotice, AlertNotices};
use em_model::{Alert, AlertId, AlertState, Role, SubjectId};
use em_store::AlertFilter;
use futures::Stream;
use serde::Deserialize;
use serde_json::json;

use super::{int_param, time_param, JsonBody, Params};
use crate::auth::CurrentUser;
use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// Triage order of the queue (the page sorts the same way): every unresolved alert before the
/// resolved ones; among the unresolved, escalated first, then the most severe — an
/// acknowledged critical stays above an open low battery — then open before acknowledged,
/// then newest.
pub(crate) fn sort_alerts(alerts: &mut [Alert]) {
    alerts.sort_by(|a, b| {
        let resolved = |x: &Alert| x.state == AlertState::Resolved;
        let open_rank = |x: &Alert| u8::from(x.state != AlertState::Open);
        resolved(a)
            .cmp(&resolved(b))
            .then(b.escalated.cmp(&a.escalated))
            .then(b.severity.cmp(&a.severity))
            .then(open_rank(a).cmp(&open_rank(b)))
            .then(b.started_at.cmp(&a.started_at))
            .then(b.id.cmp(&a.id))
    });
}

pub(crate) async fn list(
    State(st): State<AppState>,
    me: CurrentUser,
    Query(q): Query<Params>,
) -> ApiResult<Json<Vec<Alert>>> {
    let states = match q.get("state").map(|s| s.trim()).filter(|s| !s.is_empty()) {
        None => Some(vec![AlertState::Open, AlertState::Acknowledged]),
        Some("all") => None,
        Some(list) => Some(
            list.split(',')
                .map(|s| s.trim().parse::<AlertState>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ApiError::field("state", e))?,
        ),
    };
    let limit = int_param(&q, "limit")?.unwrap_or(500);
    if !(1..=5000).contains(&limit) {
        return Err(ApiError::field("limit", "must be 1..5000"));
    }
    let since = time_param(&q, "since")?;
    let subject_filter: Option<SubjectId> = int_param(&q, "subject_id")?;
    let subject_ids = match subject_filter {
        Some(sid) => {
            st.subject_for(&me, sid, "alert.list").await?;
            Some(vec![sid])
        }
        None => st.caseload_ids(&me).await?,
    };
    let mut alerts = if subject_ids.as_ref().is_some_and(|ids| ids.is_empty()) {
        Vec::new()
    } else {
        st.inner
            .store
            .list_alerts(&AlertFilter {
                subject_ids,
                states,
                since,
                limit: Some(limit),
            })
            .await?
    };
    sort_alerts(&mut alerts);
    st.audit(
        &me,
        "alert.list",
        "alert",
        None,
        subject_filter,
        json!({ "count": alerts.len(), "state": q.get("state") }),
    )
    .await?;
    Ok(Json(alerts))
}

/// Load an alert `me` may act on (via its subject); unknown ids are 403 for officers.
async fn alert_for(
    st: &AppState,
    me: &CurrentUser,
    id: AlertId,
    attempted: &str,
) -> ApiResult<Alert> {
    match st.inner.store.get_alert(id).await?.map(|v| v.alert) {
        Some(a) => {
            st.subject_for(me, a.subject_id, attempted)
                .await
                .map_err(|e| match e {
                    ApiError::NotFound(_) => ApiError::NotFound(format!("alert {id}")),
                    other => other,
                })?;
            Ok(a)
        }
        None if !AppState::caseload_only(me) => Err(ApiError::NotFound(format!("alert {id}"))),
        None => Err(st
            .deny(me, attempted, "alert", Some(id.to_string()), None)
            .await),
    }
}

pub(crate) async fn acknowledge(
    State(st): State<AppState>,
    me: CurrentUser,
    Path(id): Path<AlertId>,
) -> ApiResult<Json<Alert>> {
    alert_for(&st, &me, id, "alert.acknowledge").await?;
    // The store writes the audit record (with the previous state) in the same transaction.
    let alert = st.inner.alerts.acknowledge(id, &me.user).await?;
    Ok(Json(alert))
}

#[derive(Debug, Deserialize)]
pub(crate) struct ResolveRequest {
    code: String,
    #[serde(default)]
    note: Option<String>,
}

pub(crate) async fn resolve(
    State(st): State<AppState>,
    me: CurrentUser,
    Path(id): Path<AlertId>,
    JsonBody(req): JsonBody<ResolveRequest>,
) -> ApiResult<Json<Alert>> {
    alert_for(&st, &me, id, "alert.resolve").await?;
    let code = req.code.trim();
    let note = req
        .note
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty());
    if code.is_empty() {
        return Err(ApiError::field("code", "choose a reason code"));
    }
    if code == "other" && note.is_none() {
        return Err(ApiError::field(
            "note",
            "a note is required with reason \"other\"",
        ));
    }
    let alert = st.inner.alerts.resolve(id, &me.user, code, note).await?;
    Ok(Json(alert))
}

/// How often a live stream re-checks that its session is still valid.
const SESSION_CHECK: Duration = Duration::from_secs(10);

struct Feed {
    st: AppState,
    me: CurrentUser,
    rx: AlertNotices,
    tick: tokio::time::Interval,
    greeted: bool,
}

impl Feed {
    /// Whether the notice concerns a subject the user may see (looked up per notice, so a
    /// caseload change applies at once).
    async fn visible(&self, notice: &AlertNotice) -> bool {
        match self.me.role() {
            Role::Supervisor | Role::Admin => true,
            Role::VictimLiaison => false,
            Role::Officer => match self
                .st
                .inner
                .store
                .get_subject(notice.alert.subject_id)
                .await
            {
                Ok(Some(s)) => s.officer_id == Some(self.me.id()),
                Ok(None) => false,
                Err(e) => {
                    tracing::warn!(error = %e, "alert feed: subject lookup failed; notice withheld");
                    false
                }
            },
        }
    }

    async fn next_event(&mut self) -> Option<(Event, bool)> {
        if !self.greeted {
            self.greeted = true;
            return Some((Event::default().event("ready").data("{}"), true));
        }
        loop {
            tokio::select! {
                received = self.rx.next() => match received {
                    Ok((id, notice)) => {
                        if self.visible(&notice).await {
                            let data = serde_json::to_string(&notice).unwrap_or_else(|_| "{}".into());
                            // The change id: a browser reconnecting sends it back as
                            // Last-Event-ID and the feed goes on from there.
                            return Some((Event::default().event("alert").id(id.to_string()).data(data), true));
                        }
                    }
                    Err(e) => {
                        // The log cannot be read right now: tell the page to reload the queue
                        // (it reconnects and goes on from the last id it saw).
                        tracing::warn!(error = %e, "alert feed: change log unreadable");
                        return Some((Event::default().event("lagged").data("0"), false));
                    }
                },
                _ = self.tick.tick() => {
                    if !self.st.inner.sessions.is_live(&self.me.token).await {
                        return Some((Event::default().event("session_expired").data("{}"), false));
                    }
                }
            }
        }
    }
}

/// `GET /api/alerts/stream`: server-sent events `ready`, `alert` (an [`AlertNotice`] for the
/// caller's caseload, made on any instance; its SSE id is the change-log id), `lagged`
/// (reload the queue) and `session_expired` (stream ends). With `Last-Event-ID` (a browser
/// reconnecting) the feed first replays what the caller missed since that id.
pub(crate) async fn stream(
    State(st): State<AppState>,
    me: CurrentUser,
    headers: axum::http::HeaderMap,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    st.audit(&me, "alert.stream", "alert", None, None, json!({}))
        .await?;
    let feed = st.feed().await.map_err(ApiError::from)?;
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .filter(|id| *id >= 0 && *id <= feed.position());
    let rx = AlertNotices::new(match resume {
        Some(id) => feed.follow(id),
        None => feed.follow_live(),
    });
    let mut tick = tokio::time::interval(SESSION_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let feed = Feed {
        st,
        me,
        rx,
        tick,
        greeted: false,
    };
    let events = futures::stream::unfold(Some(feed), |feed| async move {
        let mut feed = feed?;
        let (event, more) = feed.next_event().await?;
        Some((Ok(event), more.then_some(feed)))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use em_model::{AlertKind, Severity};

    fn alert(id: i64, severity: Severity, state: AlertState, escalated: bool) -> Alert {
        let t = Utc
            .timestamp_opt(1_700_000_000 + id, 0)
            .single()
            .expect("time");
        Alert {
            id,
            subject_id: 1,
            device_id: None,
            kind: AlertKind::LowBattery,
            severity,
            state,
            zone_id: None,
            message: String::new(),
            started_at: t,
            created_at: t,
            last_seen_at: t,
            ended_at: None,
            escalated,
            acknowledged_by: None,
            acknowledged_at: None,
            resolved_by: None,
            resolved_at: None,
            resolution_code: None,
            resolution_note: None,
            evidence: serde_json::json!({}),
            occurrences: 1,
        }
    }

    #[test]
    fn triage_order() {
        let mut v = vec![
            alert(1, Severity::Low, AlertState::Open, false),
            alert(2, Severity::Critical, AlertState::Acknowledged, false),
            alert(3, Severity::Critical, AlertState::Resolved, false),
            alert(4, Severity::Medium, AlertState::Open, true),
            alert(5, Severity::Critical, AlertState::Open, false),
        ];
        sort_alerts(&mut v);
        let ids: Vec<i64> = v.iter().map(|a| a.id).collect();
        // Escalated first; then critical open, critical acknowledged, low open; resolved last.
        assert_eq!(ids, vec![4, 5, 2, 1, 3]);
    }
}
