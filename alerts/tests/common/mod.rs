//! Shared set-up of the em-alerts integration tests: real stores (SQLite always, PostgreSQL
//! when reachable), a subject with a curfew home zone, and users.
#![allow(dead_code)]

use std::sync::Arc;

use chrono::{DateTime, Utc};
use em_model::*;
use em_store::{testing, AuditFilter, Store};

/// SQLite always; PostgreSQL when reachable (else a loud SKIPPED line, or a panic when CI=true).
pub async fn stores() -> Vec<(&'static str, Arc<dyn Store>)> {
    let mut v: Vec<(&'static str, Arc<dyn Store>)> =
        vec![("sqlite", testing::sqlite_store().await)];
    if let Some(pg) = testing::postgres_store().await {
        v.push(("postgres", pg));
    }
    v
}

pub struct Fixture {
    pub subject: SubjectId,
    pub home: ZoneId,
    pub officer: User,
    pub supervisor: User,
}

pub fn curfew_schedule() -> ScheduleSpec {
    ScheduleSpec {
        windows: (1..=7)
            .map(|day| WeeklyWindow {
                day,
                start: "19:00".into(),
                end: "07:00".into(),
            })
            .collect(),
        exceptions: vec![],
    }
}

pub async fn subject(store: &Arc<dyn Store>, reference: &str) -> SubjectId {
    store
        .upsert_subject(&Subject {
            id: 0,
            reference: reference.into(),
            display_name: format!("Subject {reference}"),
            officer_id: None,
            timezone: "Europe/Copenhagen".into(),
            order_start: None,
            order_end: None,
            rules: BreachRules::default(),
        })
        .await
        .expect("insert subject")
}

pub async fn fixture(store: &Arc<dyn Store>) -> Fixture {
    let subject = subject(store, "CASE-2025-0042").await;
    let home = store
        .upsert_zone(&ZoneSpec {
            id: 0,
            subject_id: Some(subject),
            group: None,
            name: "Home".into(),
            kind: ZoneKind::Inclusion,
            geometry: ZoneGeometry::Circle {
                center: [12.5683, 55.6761],
                radius_m: 60.0,
            },
            schedule: Some(curfew_schedule()),
            is_curfew_home: true,
        })
        .await
        .expect("insert zone");
    let mut officer = User {
        id: 0,
        username: "officer.jensen".into(),
        display_name: "Officer Jensen".into(),
        role: Role::Officer,
        password_hash: String::new(),
        active: true,
    };
    officer.id = store.upsert_user(&officer).await.expect("insert officer");
    let mut supervisor = User {
        id: 0,
        username: "supervisor.berg".into(),
        display_name: "Supervisor Berg".into(),
        role: Role::Supervisor,
        password_hash: String::new(),
        active: true,
    };
    supervisor.id = store
        .upsert_user(&supervisor)
        .await
        .expect("insert supervisor");
    Fixture {
        subject,
        home,
        officer,
        supervisor,
    }
}

/// (actor, action) of every audit record about `alert`, oldest first.
pub async fn audit_of(store: &Arc<dyn Store>, alert: AlertId) -> Vec<(String, String)> {
    let mut entries = store
        .list_audit(&AuditFilter {
            target_type: Some("alert".into()),
            limit: Some(1000),
            ..Default::default()
        })
        .await
        .expect("list audit");
    entries.retain(|e| e.target_id.as_deref() == Some(alert.to_string().as_str()));
    entries.sort_by_key(|e| e.id);
    entries.into_iter().map(|e| (e.actor, e.action)).collect()
}

pub fn minutes_ago(m: i64) -> DateTime<Utc> {
    Utc::now() - chrono::Duration::minutes(m)
}

/// Reads alert notices from the store's change log, from where it was created (what the
/// live feeds of every instance see).
pub struct NoticeLog {
    store: Arc<dyn Store>,
    last: em_model::ChangeId,
}

impl NoticeLog {
    pub async fn at(store: &Arc<dyn Store>) -> Self {
        NoticeLog {
            store: store.clone(),
            last: store.last_change_id().await.expect("last change id"),
        }
    }

    /// Every alert notice written since the last call.
    pub async fn drain(&mut self) -> Vec<em_alerts::AlertNotice> {
        let mut out = Vec::new();
        loop {
            let page = self
                .store
                .changes_after(self.last, 100)
                .await
                .expect("read the change log");
            if page.is_empty() {
                return out;
            }
            for e in page {
                self.last = e.id;
                out.extend(em_alerts::AlertNotice::from_change(&e));
            }
        }
    }

    /// The next alert notice, waiting for it.
    pub async fn recv(&mut self) -> Option<em_alerts::AlertNotice> {
        let mut pending = std::collections::VecDeque::new();
        loop {
            if let Some(n) = pending.pop_front() {
                // Put back what follows (read again from the log next time).
                return Some(n);
            }
            let page = self
                .store
                .changes_after(self.last, 1)
                .await
                .expect("read the change log");
            match page.into_iter().next() {
                Some(e) => {
                    self.last = e.id;
                    pending.extend(em_alerts::AlertNotice::from_change(&e));
                }
                None => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    }
}
