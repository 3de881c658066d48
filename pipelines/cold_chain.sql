-- Refrigerated trailers: temperature, door, location and battery.
-- Firmware before 2.0 reports Fahrenheit as temp_f; 2.0 and later report Celsius as temp_c.

CREATE SOURCE trailer_readings (
    device_id  VARCHAR NOT NULL,
    seq        BIGINT  NOT NULL,
    ts         TIMESTAMP,
    temp_c     DOUBLE,
    temp_f     DOUBLE,
    door_open  BOOLEAN,
    lat        DOUBLE,
    lon        DOUBLE,
    battery    DOUBLE,
    fw         VARCHAR
) WITH (
    subject      = 'telemetry.coldchain.>',
    format       = 'json',
    dedup_key    = 'device_id, seq',
    dedup_window = '6h',
    event_time   = 'ts'
);

CREATE STREAMING TABLE usable.cold_chain (
    CONSTRAINT temperature_reported  EXPECT (temperature_c IS NOT NULL)            ON VIOLATION QUARANTINE,
    CONSTRAINT temperature_plausible EXPECT (temperature_c BETWEEN -40 AND 40)     ON VIOLATION QUARANTINE,
    CONSTRAINT battery_in_range      EXPECT (battery IS NULL OR battery BETWEEN 0 AND 100) ON VIOLATION DROP,
    CONSTRAINT has_position          EXPECT (lat IS NOT NULL AND lon IS NOT NULL)  ON VIOLATION WARN,
    CONSTRAINT known_device          EXPECT (tenant IS NOT NULL)                   ON VIOLATION WARN
)
PARTITIONED BY (event_date)
AS SELECT
    r.device_id,
    r.seq,
    r.ts,
    COALESCE(r.temp_c, (r.temp_f - 32) * 5 / 9) AS temperature_c,
    COALESCE(r.door_open, false)                 AS door_open,
    r.lat,
    r.lon,
    r.battery,
    r.fw,
    d.tenant,
    d.site,
    d.model,
    d.hw_rev,
    CAST(r.ts AS DATE)                           AS event_date
FROM trailer_readings r
LEFT JOIN reference.devices d ON d.device_id = r.device_id;
