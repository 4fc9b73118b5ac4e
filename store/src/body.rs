//! The one body of the [`Store`](crate::Store) implementation, shared by both backends.
//!
//! [`store_body!`] is written once and stamped twice, into `postgres.rs` for [`PgStore`] and
//! into `sqlite.rs` for [`SqliteStore`]: sqlx's query types are per database, so the shared
//! Rust is compiled once per backend rather than made generic over `sqlx::Database`. What
//! differs between the dialects comes from the dialect module named in the invocation
//! ([`crate::dialect::postgres`] / [`crate::dialect::sqlite`]): the statements whose SQL
//! differs, and how time, JSON and lists are bound. Rows are read by [`crate::rows`].
//! Statements that read the same in both dialects are here; they use numbered parameters
//! (`$1`), which sqlx's SQLite driver accepts as well.
//!
//! Each backend provides, besides its pool in `self.pool`:
//! * `self.begin_write()` — a write transaction (`BEGIN IMMEDIATE` on SQLite);
//! * `Self::append_change(conn, change)` — appends to the change log in the caller's
//!   transaction (PostgreSQL: transaction advisory lock + `NOTIFY`);
//! * `self.commit_changes(tx)` — commits a transaction that appended a change (SQLite: and
//!   wakes this process's change-log readers);
//! * `Self::positions_record(row)` and `Self::latest_state(row)` — `positions` and
//!   `latest_state` rows, which on PostgreSQL carry the fast write path's extra columns.
//!
//! The backend's own trait methods (positions layout and writes, change wake-ups, leases,
//! retention of positions) are passed in and end up in the same `impl Store`.
//!
//! [`PgStore`]: crate::PgStore
//! [`SqliteStore`]: crate::SqliteStore

/// Stamps the shared store body: `store_body! { store: PgStore, dialect: postgres; <the
/// backend's own `Store` methods> }`, with `dialect` the module of [`crate::dialect`] in scope
/// at the invocation.
macro_rules! store_body {
    (store: $store:ty, dialect: $d:ident; $($own:tt)*) => {
        impl $store {
            /// Runs `query` on the pool and decodes the row it finds, if any.
            async fn read_optional<T>(
                &self,
                query: sqlx::query::Query<'_, $d::Db, <$d::Db as sqlx::Database>::Arguments>,
                decode: fn(&<$d::Db as sqlx::Database>::Row) -> Result<T>,
            ) -> Result<Option<T>> {
                query
                    .fetch_optional(&self.pool)
                    .await?
                    .map(|r| decode(&r))
                    .transpose()
            }

            /// Runs `query` on the pool and decodes every row.
            async fn read_all<T>(
                &self,
                query: sqlx::query::Query<'_, $d::Db, <$d::Db as sqlx::Database>::Arguments>,
                decode: fn(&<$d::Db as sqlx::Database>::Row) -> Result<T>,
            ) -> Result<Vec<T>> {
                query
                    .fetch_all(&self.pool)
                    .await?
                    .iter()
                    .map(decode)
                    .collect()
            }

            async fn insert_audit(conn: &mut $d::Conn, e: &NewAudit) -> Result<i64> {
                let at = e.at.unwrap_or_else(Utc::now);
                Ok(sqlx::query_scalar(
                    "INSERT INTO audit (at, actor_id, actor, action, target_type, target_id,
                         subject_id, details)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
                )
                .bind($d::ts(at))
                .bind(e.actor_id)
                .bind(&e.actor)
                .bind(&e.action)
                .bind(&e.target_type)
                .bind(&e.target_id)
                .bind(e.subject_id)
                .bind($d::json("audit details", &e.details)?)
                .fetch_one(&mut *conn)
                .await?)
            }

            async fn insert_outbox(conn: &mut $d::Conn, messages: &[NewOutbox]) -> Result<()> {
                let now = Utc::now();
                for m in messages {
                    let q = sqlx::query($d::INSERT_OUTBOX)
                        .bind(&m.channel)
                        .bind(&m.ordering_key)
                        .bind(&m.idempotency_key)
                        .bind($d::json("outbox payload", &m.payload)?);
                    $d::bind_now(q, now).execute(&mut *conn).await?;
                }
                Ok(())
            }

            /// The current assignment of a device (locked where the dialect locks rows).
            async fn current_assignment(
                conn: &mut $d::Conn,
                device_id: &str,
            ) -> Result<Option<Assignment>> {
                sqlx::query($d::CURRENT_ASSIGNMENT)
                    .bind(device_id)
                    .fetch_optional(&mut *conn)
                    .await?
                    .map(|r| rows::assignment(&r))
                    .transpose()
            }

            async fn end_assignment(
                conn: &mut $d::Conn,
                device_id: &str,
                at: DateTime<Utc>,
            ) -> Result<()> {
                sqlx::query(
                    "UPDATE assignments SET valid_to = $1 WHERE device_id = $2 AND valid_to IS NULL",
                )
                .bind($d::ts(at))
                .bind(device_id)
                .execute(&mut *conn)
                .await?;
                Ok(())
            }

            /// Appends the change of a device (registry or assignments) and commits.
            async fn commit_device_change(
                &self,
                mut tx: sqlx::Transaction<'static, $d::Db>,
                device_id: &str,
            ) -> Result<()> {
                let change = Change::Device {
                    device_id: device_id.to_string(),
                };
                Self::append_change(&mut tx, &change).await?;
                self.commit_changes(tx).await
            }

            async fn zone_groups_of(
                conn: &mut $d::Conn,
                subject: SubjectId,
            ) -> Result<Vec<String>> {
                Ok(sqlx::query_scalar(
                    "SELECT group_name FROM subject_zone_groups WHERE subject_id = $1
                     ORDER BY group_name",
                )
                .bind(subject)
                .fetch_all(&mut *conn)
                .await?)
            }

            /// The status of an outbox message, locked against concurrent updates where the
            /// dialect locks rows; `NotFound` when there is no such message.
            async fn outbox_status_for_update(conn: &mut $d::Conn, id: i64) -> Result<String> {
                let status: Option<String> = sqlx::query_scalar($d::OUTBOX_STATUS_FOR_UPDATE)
                    .bind(id)
                    .fetch_optional(&mut *conn)
                    .await?;
                status.ok_or_else(|| StoreError::NotFound(format!("outbox message {id}")))
            }

            /// Inserts record rows into `positions` or `victim_positions` (same columns,
            /// without `subject_id`) in chunks; idempotent on (device, device time, sequence).
            async fn insert_record_rows(
                conn: &mut $d::Conn,
                victim: bool,
                rows: &[RecordRow],
            ) -> Result<()> {
                let head = if victim {
                    "INSERT INTO victim_positions (device_id, device_time, seq, received_time,
                       protocol, lat, lon, accuracy_m, speed_kmh, valid, battery_pct, charging,
                       beacon_in_range, extra) "
                } else {
                    "INSERT INTO positions (device_id, device_time, seq, received_time,
                       subject_id, protocol, lat, lon, accuracy_m, speed_kmh, valid, battery_pct,
                       charging, beacon_in_range, extra) "
                };
                for chunk in rows.chunks($d::MAX_ROWS_PER_INSERT) {
                    let mut qb = sqlx::QueryBuilder::<$d::Db>::new(head);
                    qb.push_values(chunk, |mut b, r| {
                        b.push_bind(&r.device_id)
                            .push_bind($d::ts(r.device_time))
                            .push_bind(r.seq)
                            .push_bind($d::ts(r.received_time));
                        if !victim {
                            b.push_bind(r.subject_id);
                        }
                        b.push_bind(r.protocol)
                            .push_bind(r.lat)
                            .push_bind(r.lon)
                            .push_bind(r.accuracy_m)
                            .push_bind(r.speed_kmh)
                            .push_bind(r.valid)
                            .push_bind(r.battery_pct)
                            .push_bind(r.charging)
                            .push_bind(r.beacon_in_range)
                            .push_bind(&r.extra)
                            .push_unseparated($d::JSON_TEXT_CAST);
                    });
                    qb.push(" ON CONFLICT (device_id, device_time, seq) DO NOTHING");
                    qb.build().execute(&mut *conn).await?;
                }
                Ok(())
            }

            /// Retention of everything but offender positions (whose layout differs):
            /// victim positions, resolved alerts, audit (through the retention gate) and the
            /// change log, in the caller's transaction.
            async fn delete_expired(
                conn: &mut $d::Conn,
                positions_before: DateTime<Utc>,
                alerts_before: Option<DateTime<Utc>>,
                audit_before: Option<DateTime<Utc>>,
            ) -> Result<RetentionReport> {
                let mut report = RetentionReport {
                    positions_deleted: sqlx::query(
                        "DELETE FROM victim_positions WHERE device_time < $1",
                    )
                    .bind($d::ts(positions_before))
                    .execute(&mut *conn)
                    .await?
                    .rows_affected(),
                    ..RetentionReport::default()
                };
                if let Some(t) = alerts_before {
                    report.alerts_deleted = sqlx::query(
                        "DELETE FROM alerts WHERE state = 'resolved' AND resolved_at < $1",
                    )
                    .bind($d::ts(t))
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                }
                if let Some(t) = audit_before {
                    sqlx::query("INSERT INTO audit_retention_gate (open) VALUES (true)")
                        .execute(&mut *conn)
                        .await?;
                    report.audit_deleted = sqlx::query("DELETE FROM audit WHERE at < $1")
                        .bind($d::ts(t))
                        .execute(&mut *conn)
                        .await?
                        .rows_affected();
                    sqlx::query("DELETE FROM audit_retention_gate")
                        .execute(&mut *conn)
                        .await?;
                }
                report.changes_deleted = sqlx::query("DELETE FROM changes WHERE at < $1")
                    .bind($d::ts(
                        Utc::now() - chrono::Duration::days(CHANGE_LOG_DAYS),
                    ))
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                Ok(report)
            }

            /// Replaces every device secret still stored as plaintext (rows written before
            /// secrets were hashed, or by an older instance during a rolling upgrade) by its
            /// stored form ([`device_secret`]), on every open. Idempotent, and safe with
            /// several instances starting at once (a row is only replaced while it still holds
            /// the value read).
            async fn hash_plaintext_secrets(pool: &sqlx::Pool<$d::Db>) -> Result<()> {
                let rows: Vec<(String, String)> = sqlx::query_as(
                    "SELECT device_id, secret FROM devices
                     WHERE secret IS NOT NULL AND (length(secret) <> 71 OR secret NOT LIKE 'sha256$%')",
                )
                .fetch_all(pool)
                .await?;
                let mut converted = 0u64;
                for (device_id, secret) in rows {
                    if device_secret::is_hashed(&secret) {
                        continue;
                    }
                    converted += sqlx::query(
                        "UPDATE devices SET secret = $1 WHERE device_id = $2 AND secret = $3",
                    )
                    .bind(device_secret::hash(&secret))
                    .bind(&device_id)
                    .bind(&secret)
                    .execute(pool)
                    .await?
                    .rows_affected();
                }
                if converted > 0 {
                    tracing::info!(
                        devices = converted,
                        "plaintext device secrets replaced by their hashes"
                    );
                }
                Ok(())
            }
        }

        #[async_trait::async_trait]
        impl Store for $store {
            $($own)*

            async fn upsert_device(&self, device: &Device) -> Result<()> {
                if device.device_id.is_empty() {
                    return Err(StoreError::Invalid("device id must not be empty".into()));
                }
                let mut tx = self.begin_write().await?;
                sqlx::query(
                    "INSERT INTO devices (device_id, protocol, secret, active, class)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (device_id) DO UPDATE SET protocol = excluded.protocol,
                       secret = excluded.secret, active = excluded.active, class = excluded.class",
                )
                .bind(&device.device_id)
                .bind(device.protocol.as_str())
                .bind(device.secret.as_deref().map(device_secret::stored_form))
                .bind(device.active)
                .bind(device.class.as_str())
                .execute(&mut *tx)
                .await?;
                self.commit_device_change(tx, &device.device_id).await
            }

            async fn get_device(&self, device_id: &str) -> Result<Option<Device>> {
                let q = sqlx::query("SELECT * FROM devices WHERE device_id = $1").bind(device_id);
                self.read_optional(q, rows::device).await
            }

            async fn list_devices(&self) -> Result<Vec<Device>> {
                let q = sqlx::query("SELECT * FROM devices ORDER BY device_id");
                self.read_all(q, rows::device).await
            }

            async fn assign_device(
                &self,
                device_id: &str,
                subject_id: SubjectId,
                from: DateTime<Utc>,
            ) -> Result<()> {
                let mut tx = self.begin_write().await?;
                if let Some(lock) = $d::LOCK_DEVICE_ASSIGNMENTS {
                    sqlx::query(lock).bind(device_id).execute(&mut *tx).await?;
                }
                if let Some(cur) = Self::current_assignment(&mut tx, device_id).await? {
                    if from < cur.from {
                        return Err(StoreError::Invalid(format!(
                            "device {device_id}: new assignment at {from} precedes the current one (from {})",
                            cur.from
                        )));
                    }
                    Self::end_assignment(&mut tx, device_id, from).await?;
                }
                sqlx::query(
                    "INSERT INTO assignments (device_id, subject_id, valid_from) VALUES ($1, $2, $3)",
                )
                .bind(device_id)
                .bind(subject_id)
                .bind($d::ts(from))
                .execute(&mut *tx)
                .await?;
                self.commit_device_change(tx, device_id).await
            }

            async fn unassign_device(&self, device_id: &str, at: DateTime<Utc>) -> Result<()> {
                let mut tx = self.begin_write().await?;
                let current = Self::current_assignment(&mut tx, device_id)
                    .await?
                    .ok_or_else(|| {
                        StoreError::NotFound(format!("no current assignment of device {device_id}"))
                    })?;
                if at < current.from {
                    return Err(StoreError::Invalid(format!(
                        "device {device_id}: unassignment at {at} precedes the assignment start {}",
                        current.from
                    )));
                }
                Self::end_assignment(&mut tx, device_id, at).await?;
                self.commit_device_change(tx, device_id).await
            }

            async fn assignments(&self, device_id: &str) -> Result<Vec<Assignment>> {
                let q = sqlx::query(
                    "SELECT * FROM assignments WHERE device_id = $1 ORDER BY valid_from, id",
                )
                .bind(device_id);
                self.read_all(q, rows::assignment).await
            }

            async fn subject_for_device_at(
                &self,
                device_id: &str,
                at: DateTime<Utc>,
            ) -> Result<Option<SubjectId>> {
                Ok(sqlx::query_scalar(
                    "SELECT subject_id FROM assignments WHERE device_id = $1 AND valid_from <= $2
                       AND (valid_to IS NULL OR valid_to > $2) ORDER BY valid_from DESC, id DESC LIMIT 1",
                )
                .bind(device_id)
                .bind($d::ts(at))
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn current_assignments(&self) -> Result<Vec<Assignment>> {
                let q = sqlx::query(
                    "SELECT * FROM assignments WHERE valid_to IS NULL ORDER BY device_id",
                );
                self.read_all(q, rows::assignment).await
            }

            async fn upsert_subject(&self, s: &Subject) -> Result<SubjectId> {
                let new = s.id == 0;
                let sql = if new {
                    "INSERT INTO subjects (reference, display_name, officer_id, timezone,
                         order_start, order_end, rules)
                     VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id"
                } else {
                    "UPDATE subjects SET reference = $1, display_name = $2, officer_id = $3,
                       timezone = $4, order_start = $5, order_end = $6, rules = $7
                     WHERE id = $8 RETURNING id"
                };
                let q = sqlx::query_scalar(sql)
                    .bind(&s.reference)
                    .bind(&s.display_name)
                    .bind(s.officer_id)
                    .bind(&s.timezone)
                    .bind($d::opt_ts(s.order_start))
                    .bind($d::opt_ts(s.order_end))
                    .bind($d::json("breach rules", &s.rules)?);
                let q = if new { q } else { q.bind(s.id) };
                let mut tx = self.begin_write().await?;
                let id: SubjectId = q
                    .fetch_optional(&mut *tx)
                    .await?
                    .ok_or_else(|| StoreError::NotFound(format!("subject {}", s.id)))?;
                let subject = Subject { id, ..s.clone() };
                Self::append_change(&mut tx, &Change::Subject { subject }).await?;
                self.commit_changes(tx).await?;
                Ok(id)
            }

            async fn get_subject(&self, id: SubjectId) -> Result<Option<Subject>> {
                let q = sqlx::query("SELECT * FROM subjects WHERE id = $1").bind(id);
                self.read_optional(q, rows::subject).await
            }

            async fn list_subjects(&self, officer: Option<UserId>) -> Result<Vec<Subject>> {
                let q = sqlx::query(
                    "SELECT * FROM subjects WHERE (CAST($1 AS BIGINT) IS NULL OR officer_id = $1)
                     ORDER BY id",
                )
                .bind(officer);
                self.read_all(q, rows::subject).await
            }

            async fn set_subject_zone_groups(
                &self,
                subject: SubjectId,
                groups: &[String],
            ) -> Result<()> {
                let mut tx = self.begin_write().await?;
                sqlx::query("DELETE FROM subject_zone_groups WHERE subject_id = $1")
                    .bind(subject)
                    .execute(&mut *tx)
                    .await?;
                for g in groups {
                    sqlx::query(
                        "INSERT INTO subject_zone_groups (subject_id, group_name) VALUES ($1, $2)
                         ON CONFLICT DO NOTHING",
                    )
                    .bind(subject)
                    .bind(g)
                    .execute(&mut *tx)
                    .await?;
                }
                let groups = Self::zone_groups_of(&mut tx, subject).await?;
                let change = Change::SubjectZoneGroups {
                    subject_id: subject,
                    groups,
                };
                Self::append_change(&mut tx, &change).await?;
                self.commit_changes(tx).await
            }

            async fn subject_zone_groups(&self, subject: SubjectId) -> Result<Vec<String>> {
                let mut conn = self.pool.acquire().await?;
                Self::zone_groups_of(&mut conn, subject).await
            }

            async fn upsert_zone(&self, z: &ZoneSpec) -> Result<ZoneId> {
                validate_zone(z)?;
                let schedule = z
                    .schedule
                    .as_ref()
                    .map(|s| $d::json("zone schedule", s))
                    .transpose()?;
                let new = z.id == 0;
                let sql = if new {
                    "INSERT INTO zones (subject_id, group_name, name, kind, geometry, schedule,
                         is_curfew_home)
                     VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id"
                } else {
                    "UPDATE zones SET subject_id = $1, group_name = $2, name = $3, kind = $4,
                       geometry = $5, schedule = $6, is_curfew_home = $7
                     WHERE id = $8 RETURNING id"
                };
                let q = sqlx::query_scalar(sql)
                    .bind(z.subject_id)
                    .bind(&z.group)
                    .bind(&z.name)
                    .bind(zone_kind_str(z.kind))
                    .bind($d::json("zone geometry", &z.geometry)?)
                    .bind(schedule)
                    .bind(z.is_curfew_home);
                let q = if new { q } else { q.bind(z.id) };
                let mut tx = self.begin_write().await?;
                let id: ZoneId = q
                    .fetch_optional(&mut *tx)
                    .await?
                    .ok_or_else(|| StoreError::NotFound(format!("zone {}", z.id)))?;
                let zone = ZoneSpec { id, ..z.clone() };
                Self::append_change(&mut tx, &Change::Zone { zone }).await?;
                self.commit_changes(tx).await?;
                Ok(id)
            }

            async fn delete_zone(&self, id: ZoneId) -> Result<()> {
                let mut tx = self.begin_write().await?;
                let subject_id: Option<Option<SubjectId>> =
                    sqlx::query_scalar("DELETE FROM zones WHERE id = $1 RETURNING subject_id")
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await?;
                let Some(subject_id) = subject_id else {
                    return Err(StoreError::NotFound(format!("zone {id}")));
                };
                let change = Change::ZoneDeleted {
                    zone_id: id,
                    subject_id,
                };
                Self::append_change(&mut tx, &change).await?;
                self.commit_changes(tx).await
            }

            async fn get_zone(&self, id: ZoneId) -> Result<Option<ZoneSpec>> {
                let q = sqlx::query("SELECT * FROM zones WHERE id = $1").bind(id);
                self.read_optional(q, rows::zone).await
            }

            async fn list_zones(&self, subject: Option<SubjectId>) -> Result<Vec<ZoneSpec>> {
                let q = sqlx::query(
                    "SELECT * FROM zones WHERE CAST($1 AS BIGINT) IS NULL OR subject_id = $1
                       OR (subject_id IS NULL AND group_name IN
                           (SELECT group_name FROM subject_zone_groups WHERE subject_id = $1))
                     ORDER BY id",
                )
                .bind(subject);
                self.read_all(q, rows::zone).await
            }

            async fn trail(
                &self,
                subject: SubjectId,
                from: DateTime<Utc>,
                to: DateTime<Utc>,
                limit: i64,
            ) -> Result<Vec<TrailPoint>> {
                let limit = check_limit(limit)?;
                let q = sqlx::query(
                    "SELECT * FROM positions WHERE subject_id = $1 AND device_time >= $2
                       AND device_time <= $3 AND lat IS NOT NULL AND lon IS NOT NULL
                     ORDER BY device_time, seq, device_id LIMIT $4",
                )
                .bind(subject)
                .bind($d::ts(from))
                .bind($d::ts(to))
                .bind(limit);
                self.read_all(q, |r| trail_point(Self::positions_record(r)?))
                    .await
            }

            async fn latest_states(
                &self,
                subjects: Option<&[SubjectId]>,
            ) -> Result<Vec<LatestState>> {
                let mut qb =
                    sqlx::QueryBuilder::<$d::Db>::new("SELECT * FROM latest_state WHERE true");
                if let Some(ids) = subjects {
                    if ids.is_empty() {
                        return Ok(Vec::new());
                    }
                    $d::push_in(&mut qb, "subject_id", ids.to_vec());
                }
                qb.push(" ORDER BY subject_id");
                self.read_all(qb.build(), Self::latest_state).await
            }

            async fn count_records(&self, device_id: &str) -> Result<i64> {
                Ok(
                    sqlx::query_scalar("SELECT count(*) FROM positions WHERE device_id = $1")
                        .bind(device_id)
                        .fetch_one(&self.pool)
                        .await?,
                )
            }

            async fn device_records(&self, device_id: &str, limit: i64) -> Result<Vec<Record>> {
                let limit = check_limit(limit)?;
                let q = sqlx::query(
                    "SELECT * FROM positions WHERE device_id = $1 ORDER BY device_time, seq LIMIT $2",
                )
                .bind(device_id)
                .bind(limit);
                self.read_all(q, Self::positions_record).await
            }

            async fn insert_victim_records(&self, records: &[Record]) -> Result<()> {
                if records.is_empty() {
                    return Ok(());
                }
                let rows = records
                    .iter()
                    .map(|r| {
                        RecordRow::from_stored(&StoredRecord {
                            subject_id: None,
                            record: r.clone(),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let mut tx = self.begin_write().await?;
                Self::insert_record_rows(&mut tx, true, &rows).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn victim_positions(
                &self,
                device_id: &str,
                from: DateTime<Utc>,
                to: DateTime<Utc>,
                limit: i64,
            ) -> Result<Vec<TrailPoint>> {
                let limit = check_limit(limit)?;
                let q = sqlx::query(
                    "SELECT * FROM victim_positions WHERE device_id = $1 AND device_time >= $2
                       AND device_time <= $3 AND lat IS NOT NULL AND lon IS NOT NULL
                     ORDER BY device_time, seq LIMIT $4",
                )
                .bind(device_id)
                .bind($d::ts(from))
                .bind($d::ts(to))
                .bind(limit);
                self.read_all(q, |r| trail_point(rows::record(r)?)).await
            }

            async fn count_victim_records(&self, device_id: &str) -> Result<i64> {
                Ok(
                    sqlx::query_scalar(
                        "SELECT count(*) FROM victim_positions WHERE device_id = $1",
                    )
                    .bind(device_id)
                    .fetch_one(&self.pool)
                    .await?,
                )
            }

            async fn write_alert(
                &self,
                w: &AlertWrite,
                effects: AlertEffectsFn<'_>,
            ) -> Result<VersionedAlert> {
                let a = &w.alert;
                // The fields an update may change come first, in the same order in both statements.
                let sql = match w.expected_version {
                    None => {
                        "INSERT INTO alerts (device_id, severity, state, message, last_seen_at,
                             ended_at, escalated, acknowledged_by, acknowledged_at, resolved_by,
                             resolved_at, resolution_code, resolution_note, evidence, occurrences,
                             subject_id, kind, zone_id, zone_key, started_at, created_at, version)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                             $16, $17, $18, $19, $20, $21, 1)
                         RETURNING *"
                    }
                    Some(_) => {
                        "UPDATE alerts SET device_id = $1, severity = $2, state = $3,
                             message = $4, last_seen_at = $5, ended_at = $6, escalated = $7,
                             acknowledged_by = $8, acknowledged_at = $9, resolved_by = $10,
                             resolved_at = $11, resolution_code = $12, resolution_note = $13,
                             evidence = $14, occurrences = $15, version = version + 1
                         WHERE id = $16 AND version = $17 RETURNING *"
                    }
                };
                let q = sqlx::query(sql)
                    .bind(&a.device_id)
                    .bind(severity_to_db(a.severity))
                    .bind(a.state.as_str())
                    .bind(&a.message)
                    .bind($d::ts(a.last_seen_at))
                    .bind($d::opt_ts(a.ended_at))
                    .bind(a.escalated)
                    .bind(a.acknowledged_by)
                    .bind($d::opt_ts(a.acknowledged_at))
                    .bind(a.resolved_by)
                    .bind($d::opt_ts(a.resolved_at))
                    .bind(&a.resolution_code)
                    .bind(&a.resolution_note)
                    .bind($d::json("evidence", &a.evidence)?)
                    .bind(a.occurrences);
                let mut tx = self.begin_write().await?;
                let row = match w.expected_version {
                    None => q
                        .bind(a.subject_id)
                        .bind(a.kind.as_str())
                        .bind(a.zone_id)
                        .bind(a.zone_id.unwrap_or(0))
                        .bind($d::ts(a.started_at))
                        .bind($d::ts(a.created_at))
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(|e| {
                            map_unique(e, || {
                                format!(
                                    "subject {} already has an ongoing {} alert for this zone",
                                    a.subject_id,
                                    a.kind.as_str()
                                )
                            })
                        })?,
                    Some(expected) => {
                        let row = q.bind(a.id).bind(expected).fetch_optional(&mut *tx).await?;
                        match row {
                            Some(r) => r,
                            None => {
                                let exists: bool = sqlx::query_scalar(
                                    "SELECT EXISTS (SELECT 1 FROM alerts WHERE id = $1)",
                                )
                                .bind(a.id)
                                .fetch_one(&mut *tx)
                                .await?;
                                return Err(if exists {
                                    StoreError::Conflict(format!(
                                        "alert {} changed meanwhile (expected version {expected})",
                                        a.id
                                    ))
                                } else {
                                    StoreError::NotFound(format!("alert {}", a.id))
                                });
                            }
                        }
                    }
                };
                let stored = rows::versioned_alert(&row)?;
                let fx = effects(&stored)?;
                Self::insert_audit(&mut tx, &fx.audit).await?;
                Self::append_change(&mut tx, &fx.change).await?;
                Self::insert_outbox(&mut tx, &fx.outbox).await?;
                self.commit_changes(tx).await?;
                Ok(stored)
            }

            async fn get_alert(&self, id: AlertId) -> Result<Option<VersionedAlert>> {
                let q = sqlx::query("SELECT * FROM alerts WHERE id = $1").bind(id);
                self.read_optional(q, rows::versioned_alert).await
            }

            async fn list_alerts(&self, f: &AlertFilter) -> Result<Vec<Alert>> {
                let mut qb = sqlx::QueryBuilder::<$d::Db>::new("SELECT * FROM alerts WHERE true");
                if let Some(ids) = &f.subject_ids {
                    if ids.is_empty() {
                        return Ok(Vec::new());
                    }
                    $d::push_in(&mut qb, "subject_id", ids.clone());
                }
                if let Some(states) = &f.states {
                    if states.is_empty() {
                        return Ok(Vec::new());
                    }
                    let states: Vec<&'static str> = states.iter().map(|s| s.as_str()).collect();
                    $d::push_in(&mut qb, "state", states);
                }
                if let Some(since) = f.since {
                    qb.push(" AND started_at >= ").push_bind($d::ts(since));
                }
                qb.push(" ORDER BY started_at DESC, severity DESC, id DESC");
                if let Some(limit) = f.limit {
                    qb.push(" LIMIT ").push_bind(check_limit(limit)?);
                }
                self.read_all(qb.build(), rows::alert).await
            }

            async fn ongoing_alert(
                &self,
                subject: SubjectId,
                kind: AlertKind,
                zone: Option<ZoneId>,
            ) -> Result<Option<VersionedAlert>> {
                let q = sqlx::query(
                    "SELECT * FROM alerts WHERE subject_id = $1 AND kind = $2 AND zone_key = $3
                       AND state <> 'resolved'",
                )
                .bind(subject)
                .bind(kind.as_str())
                .bind(zone.unwrap_or(0));
                self.read_optional(q, rows::versioned_alert).await
            }

            async fn unacknowledged_alerts(&self, before: DateTime<Utc>) -> Result<Vec<Alert>> {
                let q = sqlx::query(
                    "SELECT * FROM alerts WHERE state = 'open' AND NOT escalated AND created_at < $1
                     ORDER BY created_at, id",
                )
                .bind($d::ts(before));
                self.read_all(q, rows::alert).await
            }

            async fn due_outbox(
                &self,
                channel: &str,
                now: DateTime<Utc>,
                limit: i64,
            ) -> Result<Vec<OutboxMessage>> {
                let limit = check_limit(limit)?;
                let q = sqlx::query(
                    "SELECT o.* FROM outbox o
                     WHERE o.channel = $1 AND o.status = 'pending' AND o.next_attempt_at <= $2
                       AND o.id = (SELECT min(p.id) FROM outbox p WHERE p.channel = o.channel
                                     AND p.ordering_key = o.ordering_key AND p.status = 'pending')
                     ORDER BY o.id LIMIT $3",
                )
                .bind(channel)
                .bind($d::ts(now))
                .bind(limit);
                self.read_all(q, rows::outbox).await
            }

            async fn mark_outbox_delivered(&self, id: i64, at: DateTime<Utc>) -> Result<()> {
                let mut tx = self.begin_write().await?;
                match Self::outbox_status_for_update(&mut tx, id).await?.as_str() {
                    "pending" => {}
                    "delivered" => return Ok(()),
                    other => {
                        return Err(StoreError::Conflict(format!(
                            "outbox message {id} is {other}"
                        )))
                    }
                }
                sqlx::query(
                    "UPDATE outbox SET status = 'delivered', delivered_at = $1 WHERE id = $2",
                )
                .bind($d::ts(at))
                .bind(id)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn mark_outbox_failed(
                &self,
                id: i64,
                error: &str,
                next_attempt_at: DateTime<Utc>,
                dead: bool,
            ) -> Result<()> {
                let mut tx = self.begin_write().await?;
                match Self::outbox_status_for_update(&mut tx, id).await?.as_str() {
                    "pending" => {}
                    other => {
                        return Err(StoreError::Conflict(format!(
                            "outbox message {id} is {other}, not pending"
                        )))
                    }
                }
                sqlx::query(
                    "UPDATE outbox SET attempts = attempts + 1, last_error = $1,
                         next_attempt_at = $2, status = $3 WHERE id = $4",
                )
                .bind(error)
                .bind($d::ts(next_attempt_at))
                .bind(if dead { "dead_letter" } else { "pending" })
                .bind(id)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn outbox_status(&self, id: i64) -> Result<Option<OutboxStatus>> {
                let s: Option<String> =
                    sqlx::query_scalar("SELECT status FROM outbox WHERE id = $1")
                        .bind(id)
                        .fetch_optional(&self.pool)
                        .await?;
                s.map(|s| outbox_status_from_str(&s)).transpose()
            }

            async fn count_outbox(&self, channel: &str, status: OutboxStatus) -> Result<i64> {
                Ok(sqlx::query_scalar(
                    "SELECT count(*) FROM outbox WHERE channel = $1 AND status = $2",
                )
                .bind(channel)
                .bind(outbox_status_str(status))
                .fetch_one(&self.pool)
                .await?)
            }

            async fn changes_after(&self, after: ChangeId, limit: i64) -> Result<Vec<ChangeEntry>> {
                let limit = check_limit(limit)?;
                let q = sqlx::query(
                    "SELECT id, at, payload FROM changes WHERE id > $1 ORDER BY id LIMIT $2",
                )
                .bind(after)
                .bind(limit);
                self.read_all(q, rows::change_entry).await
            }

            async fn last_change_id(&self) -> Result<ChangeId> {
                Ok(
                    sqlx::query_scalar::<_, Option<i64>>("SELECT max(id) FROM changes")
                        .fetch_one(&self.pool)
                        .await?
                        .unwrap_or(0),
                )
            }

            async fn read_cursor(&self, consumer: &str) -> Result<Option<ChangeId>> {
                Ok(
                    sqlx::query_scalar("SELECT change_id FROM change_cursors WHERE consumer = $1")
                        .bind(consumer)
                        .fetch_optional(&self.pool)
                        .await?,
                )
            }

            async fn write_cursor(&self, consumer: &str, id: ChangeId) -> Result<()> {
                let q = sqlx::query($d::WRITE_CURSOR).bind(consumer).bind(id);
                $d::bind_now(q, Utc::now()).execute(&self.pool).await?;
                Ok(())
            }

            async fn upsert_user(&self, u: &User) -> Result<UserId> {
                if u.username.trim().is_empty() {
                    return Err(StoreError::Invalid("username must not be empty".into()));
                }
                let new = u.id == 0;
                let sql = if new {
                    "INSERT INTO users (username, display_name, role, password_hash, active)
                     VALUES ($1, $2, $3, $4, $5) RETURNING id"
                } else {
                    "UPDATE users SET username = $1, display_name = $2, role = $3,
                       password_hash = $4, active = $5 WHERE id = $6 RETURNING id"
                };
                let q = sqlx::query_scalar(sql)
                    .bind(&u.username)
                    .bind(&u.display_name)
                    .bind(u.role.as_str())
                    .bind(&u.password_hash)
                    .bind(u.active);
                let q = if new { q } else { q.bind(u.id) };
                match q.fetch_optional(&self.pool).await {
                    Ok(Some(id)) => Ok(id),
                    Ok(None) => Err(StoreError::NotFound(format!("user {}", u.id))),
                    Err(e) => Err(map_unique(e, || {
                        format!("username {:?} is already taken", u.username)
                    })),
                }
            }

            async fn get_user(&self, id: UserId) -> Result<Option<User>> {
                let q = sqlx::query("SELECT * FROM users WHERE id = $1").bind(id);
                self.read_optional(q, rows::user).await
            }

            async fn get_user_by_name(&self, username: &str) -> Result<Option<User>> {
                let q = sqlx::query("SELECT * FROM users WHERE username = $1").bind(username);
                self.read_optional(q, rows::user).await
            }

            async fn list_users(&self) -> Result<Vec<User>> {
                let q = sqlx::query("SELECT * FROM users ORDER BY id");
                self.read_all(q, rows::user).await
            }

            async fn create_session(&self, n: &NewSession) -> Result<()> {
                sqlx::query(
                    "INSERT INTO sessions (token_hash, user_id, created_at, expires_at, ends_at)
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&n.token_hash)
                .bind(n.user_id)
                .bind($d::ts(n.created_at))
                .bind($d::ts(n.expires_at.min(n.ends_at)))
                .bind($d::ts(n.ends_at))
                .execute(&self.pool)
                .await
                .map_err(|e| map_unique(e, || "session exists".to_string()))?;
                Ok(())
            }

            async fn touch_session(
                &self,
                token_hash: &str,
                now: DateTime<Utc>,
                expires_at: DateTime<Utc>,
            ) -> Result<Option<UserId>> {
                Ok(sqlx::query_scalar(
                    "UPDATE sessions SET expires_at = CASE WHEN $3 < ends_at THEN $3 ELSE ends_at END
                     WHERE token_hash = $1 AND expires_at > $2 AND ends_at > $2
                     RETURNING user_id",
                )
                .bind(token_hash)
                .bind($d::ts(now))
                .bind($d::ts(expires_at))
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn session_live(&self, token_hash: &str, now: DateTime<Utc>) -> Result<bool> {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM sessions
                     WHERE token_hash = $1 AND expires_at > $2 AND ends_at > $2",
                )
                .bind(token_hash)
                .bind($d::ts(now))
                .fetch_one(&self.pool)
                .await?;
                Ok(n > 0)
            }

            async fn delete_session(&self, token_hash: &str) -> Result<()> {
                sqlx::query("DELETE FROM sessions WHERE token_hash = $1")
                    .bind(token_hash)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn delete_user_sessions(&self, user_id: UserId, keep: Option<&str>) -> Result<u64> {
                Ok(sqlx::query(
                    "DELETE FROM sessions WHERE user_id = $1 AND token_hash <> $2",
                )
                .bind(user_id)
                .bind(keep.unwrap_or(""))
                .execute(&self.pool)
                .await?
                .rows_affected())
            }

            async fn purge_sessions(&self, now: DateTime<Utc>) -> Result<u64> {
                Ok(sqlx::query("DELETE FROM sessions WHERE expires_at <= $1 OR ends_at <= $1")
                    .bind($d::ts(now))
                    .execute(&self.pool)
                    .await?
                    .rows_affected())
            }

            async fn append_audit(&self, entry: &NewAudit) -> Result<i64> {
                let mut conn = self.pool.acquire().await?;
                Self::insert_audit(&mut conn, entry).await
            }

            async fn list_audit(&self, f: &AuditFilter) -> Result<Vec<AuditEntry>> {
                let mut qb = sqlx::QueryBuilder::<$d::Db>::new("SELECT * FROM audit WHERE true");
                if let Some(a) = f.actor_id {
                    qb.push(" AND actor_id = ").push_bind(a);
                }
                if let Some(s) = f.subject_id {
                    qb.push(" AND subject_id = ").push_bind(s);
                }
                if let Some(t) = &f.target_type {
                    qb.push(" AND target_type = ").push_bind(t.clone());
                }
                if let Some(t) = f.since {
                    qb.push(" AND at >= ").push_bind($d::ts(t));
                }
                if let Some(t) = f.until {
                    qb.push(" AND at < ").push_bind($d::ts(t));
                }
                if let Some(id) = f.before_id {
                    qb.push(" AND id < ").push_bind(id);
                }
                if let Some(a) = &f.action {
                    // A prefix match both dialects evaluate the same way (no LIKE escaping).
                    qb.push(" AND substr(action, 1, length(")
                        .push_bind(a.clone())
                        .push(")) = ")
                        .push_bind(a.clone());
                }
                qb.push(" ORDER BY at DESC, id DESC");
                if let Some(limit) = f.limit {
                    qb.push(" LIMIT ").push_bind(check_limit(limit)?);
                }
                if let Some(offset) = f.offset {
                    if f.limit.is_none() {
                        // Both dialects need a LIMIT before OFFSET; -1 / ALL differ, so: a large one.
                        qb.push(" LIMIT ").push_bind(i64::MAX);
                    }
                    qb.push(" OFFSET ").push_bind(check_limit(offset)?);
                }
                self.read_all(qb.build(), rows::audit).await
            }
        }
    };
}

pub(crate) use store_body;
