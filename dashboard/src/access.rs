//! Role and caseload checks, and the audit trail they write.
//!
//! Rules: an officer sees and changes only subjects whose `officer_id` is theirs; a supervisor
//! sees and changes every subject; an admin manages users, devices and assignments and may read
//! every subject. A victim liaison officer sees no subject (an empty caseload) and may read
//! victim devices' positions, as may a supervisor (victim data is its own class). Dynamic
//! (victim-protection) zones are created, changed and removed by supervisors only. Every denial is answered 403 *and* recorded as `access.denied`; every read of a
//! subject's data and every change is recorded. Audit writes fail closed: if the audit record
//! cannot be written, the request fails.

use em_model::{Role, Subject, SubjectId, ZoneSpec};
use em_store::NewAudit;
use serde_json::{json, Value};

use crate::auth::CurrentUser;
use crate::error::{ApiError, ApiResult};
use crate::AppState;

impl AppState {
    /// Append one audit record for `me`.
    pub(crate) async fn audit(
        &self,
        me: &CurrentUser,
        action: &str,
        target_type: &str,
        target_id: Option<String>,
        subject_id: Option<SubjectId>,
        details: Value,
    ) -> ApiResult<()> {
        self.audit_as(
            Some(me.id()),
            &me.user.username,
            action,
            target_type,
            target_id,
            subject_id,
            details,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn audit_as(
        &self,
        actor_id: Option<i64>,
        actor: &str,
        action: &str,
        target_type: &str,
        target_id: Option<String>,
        subject_id: Option<SubjectId>,
        details: Value,
    ) -> ApiResult<()> {
        let entry = NewAudit {
            at: None,
            actor_id,
            actor: actor.to_string(),
            action: action.to_string(),
            target_type: target_type.to_string(),
            target_id,
            subject_id,
            details,
        };
        self.inner.store.append_audit(&entry).await?;
        Ok(())
    }

    /// Record a denial and return the 403 to send.
    pub(crate) async fn deny(
        &self,
        me: &CurrentUser,
        attempted: &str,
        target_type: &str,
        target_id: Option<String>,
        subject_id: Option<SubjectId>,
    ) -> ApiError {
        let recorded = self
            .audit(
                me,
                "access.denied",
                target_type,
                target_id,
                subject_id,
                json!({ "attempted": attempted, "role": me.role().as_str() }),
            )
            .await;
        match recorded {
            Ok(()) => ApiError::Forbidden(format!("{attempted} is not allowed for this user")),
            Err(e) => e,
        }
    }

    /// Record a denial with the reason it was refused and return the 403 to send.
    pub(crate) async fn deny_because(
        &self,
        me: &CurrentUser,
        attempted: &str,
        target_type: &str,
        target_id: Option<String>,
        subject_id: Option<SubjectId>,
        reason: &str,
    ) -> ApiError {
        let recorded = self
            .audit(
                me,
                "access.denied",
                target_type,
                target_id,
                subject_id,
                json!({ "attempted": attempted, "role": me.role().as_str(), "reason": reason }),
            )
            .await;
        match recorded {
            Ok(()) => ApiError::Forbidden(format!("{attempted} is not allowed: {reason}")),
            Err(e) => e,
        }
    }

    /// Require one of `roles`, else 403 + `access.denied`.
    pub(crate) async fn require_role(
        &self,
        me: &CurrentUser,
        roles: &[Role],
        attempted: &str,
        target_type: &str,
    ) -> ApiResult<()> {
        if roles.contains(&me.role()) {
            Ok(())
        } else {
            Err(self.deny(me, attempted, target_type, None, None).await)
        }
    }

    /// Whether `me` sees only a caseload (officers; victim liaison officers, whose caseload is
    /// empty) rather than every subject.
    pub(crate) fn caseload_only(me: &CurrentUser) -> bool {
        matches!(me.role(), Role::Officer | Role::VictimLiaison)
    }

    /// Whether `me` may see and act on `subject`.
    pub(crate) fn may_access(me: &CurrentUser, subject: &Subject) -> bool {
        match me.role() {
            Role::Officer => subject.officer_id == Some(me.id()),
            Role::VictimLiaison => false,
            Role::Supervisor | Role::Admin => true,
        }
    }

    /// Load a subject `me` may access. Officers get 403 (not 404) for unknown ids so that ids
    /// outside their caseload cannot be probed.
    pub(crate) async fn subject_for(
        &self,
        me: &CurrentUser,
        id: SubjectId,
        attempted: &str,
    ) -> ApiResult<Subject> {
        let subject = self.inner.store.get_subject(id).await?;
        match subject {
            Some(s) if Self::may_access(me, &s) => Ok(s),
            None if !Self::caseload_only(me) => Err(ApiError::NotFound(format!("subject {id}"))),
            _ => Err(self
                .deny(me, attempted, "subject", Some(id.to_string()), Some(id))
                .await),
        }
    }

    /// Subjects `me` may see (the caseload of an officer, all for the other roles).
    pub(crate) async fn visible_subjects(&self, me: &CurrentUser) -> ApiResult<Vec<Subject>> {
        match me.role() {
            Role::Officer => Ok(self.inner.store.list_subjects(Some(me.id())).await?),
            Role::VictimLiaison => Ok(Vec::new()),
            Role::Supervisor | Role::Admin => Ok(self.inner.store.list_subjects(None).await?),
        }
    }

    /// Ids for an alert filter: `None` (all) for supervisors/admins, the caseload for officers.
    pub(crate) async fn caseload_ids(&self, me: &CurrentUser) -> ApiResult<Option<Vec<SubjectId>>> {
        if Self::caseload_only(me) {
            let subjects = self.visible_subjects(me).await?;
            Ok(Some(subjects.into_iter().map(|s| s.id).collect()))
        } else {
            Ok(None)
        }
    }

    /// Check access to a zone: a subject's zone follows the subject's caseload rule; a group
    /// zone can be read by anyone logged in but changed only by supervisors and admins.
    pub(crate) async fn check_zone_access(
        &self,
        me: &CurrentUser,
        zone: &ZoneSpec,
        write: bool,
        attempted: &str,
    ) -> ApiResult<()> {
        match zone.subject_id {
            Some(sid) => {
                let subject = self.inner.store.get_subject(sid).await?;
                match subject {
                    Some(s) if Self::may_access(me, &s) => Ok(()),
                    _ => Err(self
                        .deny(me, attempted, "zone", Some(zone.id.to_string()), Some(sid))
                        .await),
                }
            }
            None if !write || !Self::caseload_only(me) => Ok(()),
            None => Err(self
                .deny(me, attempted, "zone", Some(zone.id.to_string()), None)
                .await),
        }
    }
}
