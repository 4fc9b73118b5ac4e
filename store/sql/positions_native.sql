-- Positions, native layout: range-partitioned by device_time (monthly partitions named
-- positions_pYYYYMM, created ahead by em_ensure_position_partitions) plus a DEFAULT partition
-- so no record is ever rejected. Idempotent; applied by PgStore at start-up.

-- (The table itself is created by PgStore from positions_columns.sql, PARTITION BY RANGE
-- (device_time), before this file runs.)

CREATE INDEX IF NOT EXISTS positions_subject_time ON positions (subject_id, device_time);

CREATE TABLE IF NOT EXISTS positions_default PARTITION OF positions DEFAULT;

-- Creates the monthly partition that starts at p_month (first day of a month, UTC), moving any
-- rows of that month out of the default partition first. No-op when it exists.
CREATE OR REPLACE FUNCTION em_create_position_partition(p_month date) RETURNS boolean
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    m_start timestamptz := (date_trunc('month', p_month)::timestamp AT TIME ZONE 'UTC');
    m_end   timestamptz := ((date_trunc('month', p_month) + interval '1 month')::timestamp AT TIME ZONE 'UTC');
    part    text := 'positions_p' || to_char(date_trunc('month', p_month), 'YYYYMM');
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext(current_schema() || '.em_position_partitions'));
    IF to_regclass(quote_ident(current_schema()) || '.' || quote_ident(part)) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE positions INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part);
    EXECUTE format(
        'WITH moved AS (DELETE FROM positions_default WHERE device_time >= %L AND device_time < %L RETURNING *)
         INSERT INTO %I SELECT * FROM moved', m_start, m_end, part);
    EXECUTE format('ALTER TABLE positions ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
        part, m_start, m_end);
    RETURN true;
END
$$;

-- Maintenance: partitions from p_from's month through p_months_ahead months later.
CREATE OR REPLACE FUNCTION em_ensure_position_partitions(p_from date, p_months_ahead integer)
RETURNS integer LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    created integer := 0;
    i integer;
BEGIN
    FOR i IN 0..p_months_ahead LOOP
        IF em_create_position_partition((date_trunc('month', p_from) + make_interval(months => i))::date) THEN
            created := created + 1;
        END IF;
    END LOOP;
    RETURN created;
END
$$;
