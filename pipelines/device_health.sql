-- Device health: CPU, memory, uptime, reboots and crash reports, with firmware and hardware revision.
-- Older firmware reports memory in kilobytes (mem_kb), newer in megabytes (mem_mb).

CREATE SOURCE health_reports (
    device_id     VARCHAR NOT NULL,
    seq           BIGINT  NOT NULL,
    ts            TIMESTAMP,
    cpu_pct       DOUBLE,
    mem_kb        BIGINT,
    mem_mb        DOUBLE,
    uptime_s      BIGINT,
    reboot_reason VARCHAR,
    crash_report  VARCHAR,
    fw            VARCHAR,
    hw            VARCHAR
) WITH (
    subject    = 'telemetry.health.>',
    format     = 'json',
    dedup_key  = 'device_id, seq',
    event_time = 'ts'
);

CREATE STREAMING TABLE usable.device_health (
    CONSTRAINT cpu_in_range     EXPECT (cpu_pct IS NULL OR cpu_pct BETWEEN 0 AND 100) ON VIOLATION QUARANTINE,
    CONSTRAINT uptime_positive  EXPECT (uptime_s IS NULL OR uptime_s >= 0)            ON VIOLATION QUARANTINE,
    CONSTRAINT firmware_known   EXPECT (fw IS NOT NULL)                               ON VIOLATION WARN
)
PARTITIONED BY (event_date)
AS SELECT
    h.device_id,
    h.seq,
    h.ts,
    h.cpu_pct,
    COALESCE(h.mem_mb, h.mem_kb / 1024.0)          AS mem_mb,
    h.uptime_s,
    h.reboot_reason IS NOT NULL                    AS rebooted,
    h.reboot_reason,
    h.crash_report IS NOT NULL                     AS crashed,
    h.crash_report,
    h.fw,
    COALESCE(h.hw, d.hw_rev)                       AS hw_rev,
    d.tenant,
    d.site,
    d.model,
    CAST(h.ts AS DATE)                             AS event_date
FROM health_reports h
LEFT JOIN reference.devices d ON d.device_id = h.device_id;
