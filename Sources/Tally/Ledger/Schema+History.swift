extension Schema {
    /// Backfill runs, the replay state of dead letters, and `usage`, the query billing calls.
    static let version4 = """
        -- One row per `tally backfill` run.
        CREATE TABLE {schema}.backfill_runs (
            id bigserial PRIMARY KEY,
            topic text COLLATE "C" NOT NULL,
            -- The range as the operator gave it, for `tally backfill --list`.
            range_description text NOT NULL,
            event_time_from timestamptz,
            event_time_to timestamptz,
            status text NOT NULL CHECK (status IN ('running', 'interrupted', 'finished')),
            started_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now(),
            finished_at timestamptz
        );

        -- The range and progress of a run on each partition. `next_offset` moves in the
        -- transaction that writes the outcomes below it, so a resumed run starts there.
        CREATE TABLE {schema}.backfill_partitions (
            run_id bigint NOT NULL REFERENCES {schema}.backfill_runs (id),
            topic text COLLATE "C" NOT NULL,
            partition integer NOT NULL,
            from_offset bigint NOT NULL,
            -- The end of the range, exclusive.
            to_offset bigint NOT NULL,
            next_offset bigint NOT NULL,
            accepted bigint NOT NULL DEFAULT 0,
            -- Events whose idempotency key was accepted before at another offset.
            duplicates bigint NOT NULL DEFAULT 0,
            -- Offsets that already had an outcome (ledger row, duplicate or dead letter).
            already_recorded bigint NOT NULL DEFAULT 0,
            dead_letters bigint NOT NULL DEFAULT 0,
            -- Offsets at or past the live group's stored offset: the live workers write them.
            left_to_live_group bigint NOT NULL DEFAULT 0,
            -- Messages outside --event-time-from/--event-time-to.
            outside_time_range bigint NOT NULL DEFAULT 0,
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (run_id, topic, partition),
            CHECK (from_offset <= next_offset AND next_offset <= to_offset)
        );

        ALTER TABLE {schema}.batches
            ADD FOREIGN KEY (backfill_run) REFERENCES {schema}.backfill_runs (id);

        -- A dead letter that `tally dead-letters replay` re-drove successfully keeps its row,
        -- with a link to the ledger row of its event: a new row, or the one it duplicates.
        -- The offset's outcome is then that ledger row or a row in `duplicates`.
        ALTER TABLE {schema}.dead_letters
            ADD COLUMN resolved_ledger_id bigint,
            ADD COLUMN resolved_at timestamptz,
            ADD COLUMN replay_count integer NOT NULL DEFAULT 0,
            ADD COLUMN last_replayed_at timestamptz,
            ADD CHECK ((resolved_ledger_id IS NULL) = (resolved_at IS NULL));
        CREATE INDEX dead_letters_unresolved ON {schema}.dead_letters (kafka_topic, kafka_partition, kafka_offset)
            WHERE resolved_at IS NULL;

        -- Usage of one meter per window and group, from the per-minute rollups.
        --
        -- Windows are 'minute', 'hour', 'day' or 'month' of the IANA zone `time_zone`. Day and
        -- month windows follow the zone's calendar, so a day with a daylight-saving change is
        -- one row of 23 or 25 hours. Minute and hour windows are consecutive spans of 60
        -- seconds or 60 minutes aligned to the zone's local clock. Rows cover the rollup
        -- minutes in [from_time, to_time), so a window cut by either bound is partial.
        --
        -- With subject_filter NULL there is one row per subject; with group_keys NULL the
        -- groups are the meter's group-by values as stored, and with an array only those keys
        -- are kept (an empty array adds all groups up). Values combine per the meter's
        -- aggregation: sum and count add up, min and max take the extreme, and latest takes
        -- the value of the event with the latest time (ties go to the higher ledger id).
        CREATE FUNCTION {schema}.usage(
            meter_slug text, from_time timestamptz, to_time timestamptz, window_unit text DEFAULT 'hour',
            time_zone text DEFAULT 'UTC', subject_filter text DEFAULT NULL, group_keys text[] DEFAULT NULL)
        RETURNS TABLE (
            window_start timestamptz, window_end timestamptz, subject text, groups jsonb,
            value numeric, event_count bigint)
        LANGUAGE plpgsql STABLE
        AS $usage$
        DECLARE
            meter_aggregation text;
        BEGIN
            IF window_unit IS NULL OR window_unit NOT IN ('minute', 'hour', 'day', 'month') THEN
                RAISE EXCEPTION 'invalid window %; use minute, hour, day or month', coalesce(window_unit, 'NULL')
                    USING ERRCODE = '22023';
            END IF;
            -- Fails with 22023 on a zone name PostgreSQL does not know.
            PERFORM now() AT TIME ZONE time_zone;
            SELECT m.aggregation INTO meter_aggregation FROM {schema}.meters m WHERE m.slug = meter_slug;
            IF meter_aggregation IS NULL THEN
                RAISE EXCEPTION 'meter % is not recorded in %.meters; start a worker or run tally rebuild with it configured',
                    meter_slug, '{schema}' USING ERRCODE = '22023';
            END IF;

            RETURN QUERY
            WITH picked AS (
                SELECT r.*,
                       CASE WHEN group_keys IS NULL THEN r.groups
                            ELSE (SELECT coalesce(jsonb_object_agg(k, r.groups -> k), '{}'::jsonb)
                                  FROM unnest(group_keys) AS k)
                       END AS kept_groups,
                       r.minute AT TIME ZONE time_zone AS local_minute
                FROM {schema}.rollups r
                WHERE r.meter = meter_slug
                  AND r.minute >= from_time AND r.minute < to_time
                  AND (subject_filter IS NULL OR r.subject = subject_filter)
            ), windowed AS (
                SELECT p.*,
                       CASE WHEN window_unit IN ('minute', 'hour')
                            -- The offset in force at this minute places the local boundary, so
                            -- the repeated hour of a fall-back change stays two windows.
                            THEN p.minute - (p.local_minute - date_trunc(window_unit, p.local_minute))
                            ELSE date_trunc(window_unit, p.local_minute) AT TIME ZONE time_zone
                       END AS start_time,
                       CASE WHEN window_unit IN ('minute', 'hour')
                            THEN p.minute - (p.local_minute - date_trunc(window_unit, p.local_minute))
                                 + ('1 ' || window_unit)::interval
                            ELSE (date_trunc(window_unit, p.local_minute) + ('1 ' || window_unit)::interval)
                                 AT TIME ZONE time_zone
                       END AS end_time
                FROM picked p
            )
            SELECT w.start_time, w.end_time, w.subject::text, w.kept_groups,
                   CASE meter_aggregation
                       WHEN 'sum' THEN sum(w.sum)
                       WHEN 'count' THEN sum(w.event_count)::numeric
                       WHEN 'min' THEN min(w.min)
                       WHEN 'max' THEN max(w.max)
                       ELSE (array_agg(w.latest ORDER BY w.latest_time DESC, w.latest_ledger_id DESC))[1]
                   END,
                   sum(w.event_count)::bigint
            FROM windowed w
            GROUP BY w.start_time, w.end_time, w.subject, w.kept_groups
            ORDER BY w.start_time, w.subject, w.kept_groups;
        END
        $usage$;
        """
}
