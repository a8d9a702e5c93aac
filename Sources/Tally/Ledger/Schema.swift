/// The versioned schema. Each migration runs once, in order, in its own transaction, and
/// `schema_migrations` records it. Released migrations are never edited; changes go into a
/// new one.
///
/// Text columns that hold event data use the "C" collation, so that PostgreSQL compares and
/// sorts them by bytes, as Tally's in-memory maps do.
enum Schema {
    struct Migration {
        let version: Int
        let description: String
        /// The SQL, with `{schema}` standing for the quoted schema name.
        let sql: String
    }

    /// The length of one `dedupe_keys` partition, in seconds: 7 days.
    static let dedupePeriodSeconds: Int64 = 7 * 86_400

    static let migrations: [Migration] = [
        Migration(
            version: 1, description: "ledger, rollups, dedupe keys, duplicates, dead letters and offsets", sql: version1
        ),
        Migration(version: 2, description: "offset ranges of committed batches", sql: version2),
        Migration(version: 3, description: "worker status", sql: version3),
        Migration(
            version: 4, description: "backfill runs, dead-letter replay and the usage function", sql: version4),
    ]

    static var latestVersion: Int { migrations.last!.version }

    private static let version1 = """
        CREATE TABLE {schema}.settings (
            name text PRIMARY KEY,
            value text NOT NULL
        );
        INSERT INTO {schema}.settings (name, value) VALUES ('dedupe_period_seconds', '\(dedupePeriodSeconds)');

        -- The stored offset of each partition: the next offset to read. Batches advance it with
        -- a compare-and-set in the transaction that writes their outcomes.
        CREATE TABLE {schema}.partition_offsets (
            topic text COLLATE "C" NOT NULL,
            partition integer NOT NULL,
            first_offset bigint NOT NULL,
            next_offset bigint NOT NULL,
            accepted bigint NOT NULL DEFAULT 0,
            unmetered bigint NOT NULL DEFAULT 0,
            duplicates bigint NOT NULL DEFAULT 0,
            dead_letters bigint NOT NULL DEFAULT 0,
            -- The Kafka consumer group of the worker that committed last, to detect two groups
            -- writing one schema.
            consumer_group text,
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (topic, partition),
            CHECK (next_offset >= first_offset)
        );

        CREATE TABLE {schema}.dead_letter_counts (
            topic text COLLATE "C" NOT NULL,
            partition integer NOT NULL,
            reason text NOT NULL,
            count bigint NOT NULL,
            PRIMARY KEY (topic, partition, reason)
        );

        -- Offsets below a stored offset that carried no message: transaction markers, compacted
        -- records, or data the broker removed before Tally read it.
        CREATE TABLE {schema}.offset_gaps (
            topic text COLLATE "C" NOT NULL,
            partition integer NOT NULL,
            from_offset bigint NOT NULL,
            to_offset bigint NOT NULL,
            reason text NOT NULL,
            detected_at timestamptz NOT NULL,
            PRIMARY KEY (topic, partition, from_offset),
            CHECK (to_offset >= from_offset)
        );

        CREATE SEQUENCE {schema}.ledger_id_seq;

        -- The append-only audit trail: one row per accepted event.
        CREATE TABLE {schema}.ledger (
            id bigint PRIMARY KEY DEFAULT nextval('{schema}.ledger_id_seq'),
            source text COLLATE "C" NOT NULL,
            event_id text COLLATE "C" NOT NULL,
            type text COLLATE "C" NOT NULL,
            subject text COLLATE "C" NOT NULL,
            event_time timestamptz NOT NULL,
            data jsonb,
            attributes jsonb NOT NULL,
            meters jsonb NOT NULL,
            payload_sha256 bytea NOT NULL,
            kafka_topic text COLLATE "C" NOT NULL,
            kafka_partition integer NOT NULL,
            kafka_offset bigint NOT NULL,
            kafka_timestamp timestamptz,
            ingested_at timestamptz NOT NULL,
            UNIQUE (kafka_topic, kafka_partition, kafka_offset)
        );
        ALTER SEQUENCE {schema}.ledger_id_seq OWNED BY {schema}.ledger.id;
        CREATE INDEX ledger_subject_time ON {schema}.ledger (subject, event_time);
        CREATE INDEX ledger_key ON {schema}.ledger (source, event_id);
        CREATE INDEX ledger_event_time ON {schema}.ledger (event_time);

        -- Idempotency keys accepted recently, partitioned by 7-day periods of the worker clock
        -- so that old keys go with a DROP instead of row deletes.
        CREATE TABLE {schema}.dedupe_keys (
            period integer NOT NULL,
            source text COLLATE "C" NOT NULL,
            event_id text COLLATE "C" NOT NULL,
            payload_sha256 bytea NOT NULL,
            ledger_id bigint NOT NULL,
            PRIMARY KEY (source, event_id, period)
        ) PARTITION BY RANGE (period);

        CREATE TABLE {schema}.duplicates (
            id bigserial PRIMARY KEY,
            source text COLLATE "C" NOT NULL,
            event_id text COLLATE "C" NOT NULL,
            original_ledger_id bigint NOT NULL,
            kafka_topic text COLLATE "C" NOT NULL,
            kafka_partition integer NOT NULL,
            kafka_offset bigint NOT NULL,
            kafka_timestamp timestamptz,
            received_at timestamptz NOT NULL,
            UNIQUE (kafka_topic, kafka_partition, kafka_offset)
        );
        CREATE INDEX duplicates_original ON {schema}.duplicates (original_ledger_id);

        CREATE TABLE {schema}.dead_letters (
            id bigserial PRIMARY KEY,
            reason text NOT NULL,
            detail text NOT NULL,
            kafka_topic text COLLATE "C" NOT NULL,
            kafka_partition integer NOT NULL,
            kafka_offset bigint NOT NULL,
            kafka_timestamp timestamptz,
            message_key bytea,
            message_value bytea,
            headers jsonb NOT NULL,
            event_source text COLLATE "C",
            event_id text COLLATE "C",
            original_ledger_id bigint,
            received_at timestamptz NOT NULL,
            UNIQUE (kafka_topic, kafka_partition, kafka_offset)
        );
        CREATE INDEX dead_letters_reason ON {schema}.dead_letters (reason, received_at);

        -- Per-minute rollups. Each row keeps the event count and, for meters with a value, the
        -- sum, minimum, maximum and the latest value by event time (ties go to the higher
        -- ledger id), so any aggregation can be read from it.
        CREATE TABLE {schema}.rollups (
            meter text COLLATE "C" NOT NULL,
            subject text COLLATE "C" NOT NULL,
            groups jsonb NOT NULL,
            minute timestamptz NOT NULL,
            event_count bigint NOT NULL,
            sum numeric NOT NULL,
            min numeric NOT NULL,
            max numeric NOT NULL,
            latest numeric NOT NULL,
            latest_time timestamptz NOT NULL,
            latest_ledger_id bigint NOT NULL,
            updated_at timestamptz NOT NULL,
            PRIMARY KEY (meter, subject, groups, minute),
            CHECK (minute = date_trunc('minute', minute AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')
        );
        CREATE INDEX rollups_subject_minute ON {schema}.rollups (subject, minute);

        -- The meters of the running configuration, for SQL readers of the rollups.
        CREATE TABLE {schema}.meters (
            slug text COLLATE "C" PRIMARY KEY,
            event_type text COLLATE "C" NOT NULL,
            aggregation text NOT NULL CHECK (aggregation IN ('sum', 'count', 'min', 'max', 'latest')),
            value_path text,
            group_by jsonb NOT NULL,
            updated_at timestamptz NOT NULL
        );

        -- Each rollup row with the value its meter's aggregation reads.
        CREATE VIEW {schema}.usage_per_minute AS
        SELECT r.meter, r.subject, r.groups, r.minute,
               CASE m.aggregation
                   WHEN 'sum' THEN r.sum
                   WHEN 'count' THEN r.event_count::numeric
                   WHEN 'min' THEN r.min
                   WHEN 'max' THEN r.max
                   WHEN 'latest' THEN r.latest
               END AS value,
               m.aggregation, r.event_count
        FROM {schema}.rollups r
        JOIN {schema}.meters m ON m.slug = r.meter;

        -- Rollup rows that differ from the ledger rows they summarize. Empty when the rollups
        -- equal the ledger, which every committed batch preserves.
        CREATE VIEW {schema}.rollup_mismatches AS
        WITH from_ledger AS (
            SELECT m.key AS meter, l.subject, m.value -> 'groups' AS groups,
                   date_trunc('minute', l.event_time AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS minute,
                   count(*) AS event_count,
                   sum((m.value ->> 'quantity')::numeric) AS sum,
                   min((m.value ->> 'quantity')::numeric) AS min,
                   max((m.value ->> 'quantity')::numeric) AS max
            FROM {schema}.ledger l
            CROSS JOIN LATERAL jsonb_each(l.meters) AS m
            GROUP BY 1, 2, 3, 4
        )
        SELECT coalesce(r.meter, f.meter) AS meter,
               coalesce(r.subject, f.subject) AS subject,
               coalesce(r.groups, f.groups) AS groups,
               coalesce(r.minute, f.minute) AS minute,
               r.event_count AS rollup_count, f.event_count AS ledger_count,
               r.sum AS rollup_sum, f.sum AS ledger_sum
        FROM {schema}.rollups r
        FULL JOIN from_ledger f
          ON f.meter = r.meter AND f.subject = r.subject AND f.groups = r.groups AND f.minute = r.minute
        WHERE r.meter IS NULL OR f.meter IS NULL
           OR r.event_count <> f.event_count OR r.sum <> f.sum OR r.min <> f.min OR r.max <> f.max;
        """

    private static let version2 = """
        -- One row per partition of each committed batch: the offsets it took the stored offset
        -- from and to, and the outcomes it wrote. The live batches of a partition form a chain
        -- from partition_offsets.first_offset to partition_offsets.next_offset with no hole and
        -- no overlap. Backfill runs record their batches with backfill_run set; those never
        -- move a stored offset.
        CREATE TABLE {schema}.batches (
            id bigserial PRIMARY KEY,
            topic text COLLATE "C" NOT NULL,
            partition integer NOT NULL,
            from_offset bigint NOT NULL,
            next_offset bigint NOT NULL,
            accepted bigint NOT NULL,
            duplicates bigint NOT NULL,
            dead_letters bigint NOT NULL,
            consumer_group text,
            backfill_run bigint,
            committed_at timestamptz NOT NULL DEFAULT now(),
            CHECK (next_offset > from_offset)
        );
        CREATE UNIQUE INDEX batches_live_chain ON {schema}.batches (topic, partition, from_offset)
            WHERE backfill_run IS NULL;
        CREATE INDEX batches_backfill ON {schema}.batches (backfill_run) WHERE backfill_run IS NOT NULL;
        """

    private static let version3 = """
        -- One row per worker process, written by the worker every few seconds: its consumer
        -- group, the partitions it consumes, their lag, and whether it makes progress. `tally
        -- stats` reads it. A row whose heartbeat_at is old belongs to a worker that is gone.
        CREATE TABLE {schema}.workers (
            worker_id text PRIMARY KEY,
            consumer_group text NOT NULL,
            host text NOT NULL,
            pid integer NOT NULL,
            status text NOT NULL,
            detail text NOT NULL DEFAULT '',
            partitions text NOT NULL DEFAULT '',
            lag bigint,
            started_at timestamptz NOT NULL,
            last_progress_at timestamptz,
            heartbeat_at timestamptz NOT NULL
        );
        """
}
