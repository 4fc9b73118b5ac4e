//! Administration: users, devices and device assignments (admin only; supervisors may list
//! users to assign caseloads).

use super::Path;
use axum::extract::State;
use axum::Json;
use chrono::Utc;
use em_model::{Device, Protocol, Role, SubjectId, User, UserId};
use em_store::device_secret;
use serde::Serialize;
use serde_json::{json, Value};

use super::JsonBody;
use crate::auth::{CurrentUser, MIN_PASSWORD_LEN};
use crate::error::{ApiError, ApiResult, FieldErrors};
use crate::AppState;

pub(crate) async fn list_users(
    State(st): State<AppState>,
    me: CurrentUser,
) -> ApiResult<Json<Vec<User>>> {
    st.require_role(&me, &[Role::Supervisor, Role::Admin], "user.list", "user")
        .await?;
    let users = st.inner.store.list_users().await?;
    st.audit(
        &me,
        "user.list",
        "user",
        None,
        None,
        json!({ "count": users.len() }),
    )
    .await?;
    Ok(Json(users))
}

fn valid_username(s: &str) -> bool {
    (3..=64).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
}

/// What is wrong with a device id for its protocol, if anything: GT06/Concox and Teltonika
/// identify by IMEI (15 digits; GT06 sends it as 8 BCD bytes, a leading 0 dropped), H02 by a
/// numeric terminal id (10 to 15 digits). A device registered under an id it can never send
/// would never be admitted — or, worse, a typo would register a stranger's id.
fn device_id_format_error(p: Protocol, id: &str) -> Option<&'static str> {
    let digits = id.bytes().all(|b| b.is_ascii_digit());
    match p {
        Protocol::Gt06 | Protocol::Teltonika if !(digits && id.len() == 15) => {
            Some("must be the device's IMEI: 15 digits")
        }
        Protocol::H02 if !(digits && (10..=15).contains(&id.len())) => {
            Some("must be the device's numeric id: 10 to 15 digits")
        }
        _ => None,
    }
}

fn role_field(v: Option<&Value>, errors: &mut FieldErrors) -> Option<Role> {
    match v.and_then(Value::as_str).map(str::parse::<Role>) {
        Some(Ok(r)) => Some(r),
        _ => {
            errors.insert("role".into(), "must be officer, supervisor or admin".into());
            None
        }
    }
}

fn password_field(v: Option<&Value>, errors: &mut FieldErrors) -> Option<String> {
    match v.and_then(Value::as_str) {
        Some(p) if p.chars().count() >= MIN_PASSWORD_LEN && p.len() <= 1024 => Some(p.to_string()),
        _ => {
            errors.insert(
                "password".into(),
                format!("must have at least {MIN_PASSWORD_LEN} characters"),
            );
            None
        }
    }
}

fn display_name_field(v: Option<&Value>, errors: &mut FieldErrors) -> Option<String> {
    match v.and_then(Value::as_str).map(str::trim) {
        Some(n) if !n.is_empty() && n.chars().count() <= 100 => Some(n.to_string()),
        _ => {
            errors.insert("display_name".into(), "must be 1..100 characters".into());
            None
        }
    }
}

pub(crate) async fn create_user(
    State(st): State<AppState>,
    me: CurrentUser,
    JsonBody(input): JsonBody<Value>,
) -> ApiResult<Json<User>> {
    st.require_role(&me, &[Role::Admin], "user.create", "user")
        .await?;
    let mut errors = FieldErrors::new();
    let username = input
        .get("username")
        .and_then(Value::as_str)
        .map(|s| s.trim().to_string())
        .filter(|s| valid_username(s));
    if username.is_none() {
        errors.insert(
            "username".into(),
            "must be 3..64 characters: a-z, 0-9, '.', '_' or '-'".into(),
        );
    }
    let display_name = display_name_field(input.get("display_name"), &mut errors);
    let role = role_field(input.get("role"), &mut errors);
    let password = password_field(input.get("password"), &mut errors);
    let (Some(username), Some(display_name), Some(role), Some(password)) =
        (username, display_name, role, password)
    else {
        return Err(ApiError::Validation(errors));
    };
    if st.inner.store.get_user_by_name(&username).await?.is_some() {
        return Err(ApiError::field("username", "is already taken"));
    }
    let mut user = User {
        id: 0,
        username,
        display_name,
        role,
        password_hash: st.settings.password_checks.hash(password).await?,
        active: true,
    };
    user.id = st.inner.store.upsert_user(&user).await?;
    st.audit(
        &me,
        "user.create",
        "user",
        Some(user.id.to_string()),
        None,
        json!({ "username": user.username, "role": user.role }),
    )
    .await?;
    Ok(Json(user))
}

pub(crate) async fn update_user(
    State(st): State<AppState>,
    me: CurrentUser,
    Path(id): Path<UserId>,
    JsonBody(input): JsonBody<Value>,
) -> ApiResult<Json<User>> {
    st.require_role(&me, &[Role::Admin], "user.update", "user")
        .await?;
    if !input.is_object() {
        return Err(ApiError::field("_", "expected a JSON object"));
    }
    let before = st
        .inner
        .store
        .get_user(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("user {id}")))?;
    let mut user = before.clone();
    let mut errors = FieldErrors::new();
    let mut changed = Vec::new();
    if input.get("display_name").is_some() {
        if let Some(n) = display_name_field(input.get("display_name"), &mut errors) {
            user.display_name = n;
            changed.push("display_name");
        }
    }
    if input.get("role").is_some() {
        if let Some(r) = role_field(input.get("role"), &mut errors) {
            if id == me.id() && r != Role::Admin {
                errors.insert(
                    "role".into(),
                    "you cannot remove your own admin role".into(),
                );
            }
            user.role = r;
            changed.push("role");
        }
    }
    match input.get("active") {
        None | Some(Value::Null) => {}
        Some(Value::Bool(a)) => {
            if id == me.id() && !a {
                errors.insert("active".into(), "you cannot deactivate yourself".into());
            }
            user.active = *a;
            changed.push("active");
        }
        Some(_) => {
            errors.insert("active".into(), "must be true or false".into());
        }
    }
    let new_password = match input.get("password") {
        None | Some(Value::Null) => None,
        Some(v) => password_field(Some(v), &mut errors),
    };
    // Changing one's own password needs the current one (a stolen session must not be
    // enough to take the account over).
    let own_current = match (&new_password, id == me.id()) {
        (Some(_), true) => match input.get("current_password").and_then(Value::as_str) {
            Some(c) if !c.is_empty() => Some(c.to_string()),
            _ => {
                errors.insert(
                    "current_password".into(),
                    "required to change your own password".into(),
                );
                None
            }
        },
        _ => None,
    };
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    if let Some(current) = own_current {
        let ok = st
            .settings
            .password_checks
            .verify(current, before.password_hash.clone())
            .await?;
        if !ok {
            return Err(ApiError::field(
                "current_password",
                "is not your current password",
            ));
        }
    }
    if let Some(pw) = new_password {
        user.password_hash = st.settings.password_checks.hash(pw).await?;
        changed.push("password");
    }
    st.inner.store.upsert_user(&user).await?;
    if changed.contains(&"password") || !user.active || user.role != before.role {
        if id == me.id() {
            // Their own change: every other session ends, this one stays.
            st.inner.sessions.remove_user_except(id, &me.token).await?;
        } else {
            st.inner.sessions.remove_user(id).await?;
        }
    }
    st.audit(
        &me,
        "user.update",
        "user",
        Some(id.to_string()),
        None,
        json!({ "changed": changed, "before": { "display_name": before.display_name,
                "role": before.role, "active": before.active } }),
    )
    .await?;
    Ok(Json(user))
}

#[derive(Debug, Serialize)]
pub(crate) struct DeviceRow {
    device_id: String,
    protocol: Protocol,
    active: bool,
    has_secret: bool,
    subject_id: Option<SubjectId>,
    assigned_from: Option<chrono::DateTime<Utc>>,
    class: em_model::DeviceClass,
}

pub(crate) async fn list_devices(
    State(st): State<AppState>,
    me: CurrentUser,
) -> ApiResult<Json<Vec<DeviceRow>>> {
    st.require_role(&me, &[Role::Admin], "device.list", "device")
        .await?;
    let devices = st.inner.store.list_devices().await?;
    let assignments = st.inner.store.current_assignments().await?;
    let rows: Vec<DeviceRow> = devices
        .into_iter()
        .map(|d| {
            let a = assignments.iter().find(|a| a.device_id == d.device_id);
            DeviceRow {
                has_secret: d.secret.is_some(),
                subject_id: a.map(|a| a.subject_id),
                assigned_from: a.map(|a| a.from),
                class: d.class,
                device_id: d.device_id,
                protocol: d.protocol,
                active: d.active,
            }
        })
        .collect();
    st.audit(
        &me,
        "device.list",
        "device",
        None,
        None,
        json!({ "count": rows.len() }),
    )
    .await?;
    Ok(Json(rows))
}

fn valid_device_id(s: &str) -> bool {
    // `alerts` is reserved: em/v1/alerts/# is the alert feed, and the broker ACL
    // `em/v1/%u/#` would let a device of that name publish on it.
    s != "alerts"
        && (1..=64).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
}

pub(crate) async fn upsert_device(
    State(st): State<AppState>,
    me: CurrentUser,
    JsonBody(input): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    st.require_role(&me, &[Role::Admin], "device.upsert", "device")
        .await?;
    let mut errors = FieldErrors::new();
    let device_id = input
        .get("device_id")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| valid_device_id(s))
        .map(str::to_string);
    if device_id.is_none() {
        errors.insert(
            "device_id".into(),
            "must be 1..64 characters: letters, digits, '-', '_', '.', ':'".into(),
        );
    }
    let protocol = match input
        .get("protocol")
        .and_then(Value::as_str)
        .map(str::parse::<Protocol>)
    {
        Some(Ok(p)) => {
            if let Some(id) = &device_id {
                if let Some(why) = device_id_format_error(p, id) {
                    errors.insert("device_id".into(), why.into());
                }
            }
            Some(p)
        }
        Some(Err(e)) => {
            errors.insert("protocol".into(), e);
            None
        }
        None => {
            errors.insert("protocol".into(), "is required".into());
            None
        }
    };
    let secret = match input.get("secret") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s))
            if (device_secret::MIN_LEN..=device_secret::MAX_LEN).contains(&s.chars().count())
                && !s.starts_with(device_secret::PREFIX) =>
        {
            Some(s.clone())
        }
        Some(_) => {
            errors.insert(
                "secret".into(),
                format!(
                    "must be {}..{} characters of random text (leave it out to have one generated)",
                    device_secret::MIN_LEN,
                    device_secret::MAX_LEN
                ),
            );
            None
        }
    };
    let rotate = match input.get("rotate_secret") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            errors.insert("rotate_secret".into(), "must be true or false".into());
            false
        }
    };
    if let Some(p) = protocol.filter(|p| !p.carries_secret()) {
        if secret.is_some() || rotate {
            errors.insert(
                "secret".into(),
                format!(
                    "{p} devices cannot carry a secret (their identity is the IMEI): put their \
                     listener behind a private APN/VPN and its allow list"
                ),
            );
        }
    }
    let active = match input.get("active") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            errors.insert("active".into(), "must be true or false".into());
            true
        }
    };
    let (Some(device_id), Some(protocol)) = (device_id, protocol) else {
        return Err(ApiError::Validation(errors));
    };
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let existing = st.inner.store.get_device(&device_id).await?;
    let created = existing.is_none();
    let class = existing.as_ref().map(|d| d.class).unwrap_or_default();
    // Devices of protocols that carry a secret always have one: the one given, the current
    // one, or a generated one that is returned in this response only (the store keeps its
    // hash and nobody can read it back). IMEI-only devices keep none.
    let mut generated = None;
    let stored_secret = if !protocol.carries_secret() {
        None
    } else if let Some(s) = secret {
        Some(s)
    } else if let (false, Some(current)) = (rotate, existing.and_then(|d| d.secret)) {
        Some(current)
    } else {
        let s = device_secret::generate();
        generated = Some(s.clone());
        Some(s)
    };
    let device = Device {
        secret: stored_secret,
        device_id,
        protocol,
        active,
        class,
    };
    st.inner.store.upsert_device(&device).await?;
    st.audit(
        &me,
        if created {
            "device.create"
        } else {
            "device.update"
        },
        "device",
        Some(device.device_id.clone()),
        None,
        json!({ "protocol": device.protocol, "active": device.active,
                "has_secret": device.secret.is_some(),
                "secret_generated": generated.is_some() }),
    )
    .await?;
    let mut body = json!({
        "device_id": device.device_id, "protocol": device.protocol,
        "active": device.active, "has_secret": device.secret.is_some(),
    });
    if let Some(s) = generated {
        // Shown once: give it to the device (OsmAnd `token`, MQTT password) now.
        body["secret"] = Value::String(s);
    }
    Ok(Json(body))
}

pub(crate) async fn assign_device(
    State(st): State<AppState>,
    me: CurrentUser,
    Path(device_id): Path<String>,
    JsonBody(input): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    st.require_role(&me, &[Role::Admin], "device.assign", "device")
        .await?;
    match st.inner.store.get_device(&device_id).await? {
        None => return Err(ApiError::NotFound(format!("device {device_id}"))),
        Some(d) if d.class == em_model::DeviceClass::Victim => {
            return Err(ApiError::field(
                "device_id",
                "a protected person's (victim) device cannot be assigned to a subject",
            ))
        }
        Some(_) => {}
    }
    let Some(subject_id) = input.get("subject_id").and_then(Value::as_i64) else {
        return Err(ApiError::field("subject_id", "must be a subject id"));
    };
    if st.inner.store.get_subject(subject_id).await?.is_none() {
        return Err(ApiError::field("subject_id", "no such subject"));
    }
    let at = Utc::now();
    st.inner
        .store
        .assign_device(&device_id, subject_id, at)
        .await?;
    st.audit(
        &me,
        "device.assign",
        "device",
        Some(device_id.clone()),
        Some(subject_id),
        json!({ "from": at }),
    )
    .await?;
    Ok(Json(
        json!({ "device_id": device_id, "subject_id": subject_id, "from": at }),
    ))
}

pub(crate) async fn unassign_device(
    State(st): State<AppState>,
    me: CurrentUser,
    Path(device_id): Path<String>,
) -> ApiResult<Json<Value>> {
    st.require_role(&me, &[Role::Admin], "device.unassign", "device")
        .await?;
    let previous = st
        .inner
        .store
        .current_assignments()
        .await?
        .into_iter()
        .find(|a| a.device_id == device_id);
    let Some(previous) = previous else {
        return Err(ApiError::NotFound(format!(
            "device {device_id} is not assigned"
        )));
    };
    let at = Utc::now();
    st.inner.store.unassign_device(&device_id, at).await?;
    st.audit(
        &me,
        "device.unassign",
        "device",
        Some(device_id.clone()),
        Some(previous.subject_id),
        json!({ "at": at }),
    )
    .await?;
    Ok(Json(json!({ "device_id": device_id, "unassigned_at": at })))
}
