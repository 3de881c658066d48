"""DuckDB's side of the fleet_query benchmark (benches/src/fleet_query.rs).

    python fleet_duckdb.py <delta table folder> <root-cause statement file> <runs>

Reads the Parquet files the Delta log lists (deltalake's file_uris), runs the root-cause statement
fleetlake answered with as it is, and the outliers question with DuckDB's median and mad, each
`runs` times after one warm-up; prints JSON: the latencies in ms, the outlier devices and the
first root-cause row.
"""
import json
import sys
import time

import duckdb
from deltalake import DeltaTable

OUTLIERS = """
WITH readings AS (
  SELECT device_id, model, hw_rev, CAST(temperature_c AS DOUBLE) AS value, ts
  FROM usable.fleet_bench WHERE temperature_c IS NOT NULL AND ts IS NOT NULL
),
devices AS (
  SELECT device_id, model, hw_rev, avg(value) AS value, count(*) AS readings, max(ts) AS last_seen
  FROM readings GROUP BY device_id, model, hw_rev
),
scored AS (
  SELECT *, count(value) OVER c AS cohort_size, median(value) OVER c AS cohort_median,
    mad(value) OVER c AS cohort_mad
  FROM devices WINDOW c AS (PARTITION BY model, hw_rev)
)
SELECT device_id, model, hw_rev, value, readings, CAST(last_seen AS VARCHAR) AS last_seen,
  (value - cohort_median) / (1.4826 * cohort_mad) AS score, cohort_size, cohort_median,
  1.4826 * cohort_mad AS cohort_spread
FROM scored
WHERE cohort_size >= 5 AND abs((value - cohort_median) / (1.4826 * cohort_mad)) > 3.5
ORDER BY abs(score) DESC, device_id
LIMIT 101
"""


def timed(con, sql, runs):
    times, rows = [], None
    for run in range(runs + 1):
        started = time.perf_counter()
        rows = con.execute(sql).fetchall()
        if run > 0:
            times.append((time.perf_counter() - started) * 1000.0)
    return times, rows


def main():
    table, sql_file, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    files = DeltaTable(table).file_uris()
    con = duckdb.connect()
    con.execute("CREATE SCHEMA usable")
    con.execute(f"CREATE VIEW usable.fleet_bench AS SELECT * FROM read_parquet({files!r})")
    outliers_ms, outliers = timed(con, OUTLIERS, runs)
    with open(sql_file) as f:
        root_cause_sql = f.read()
    root_cause_ms, root_cause = timed(con, root_cause_sql, runs)
    print(json.dumps({
        "outliers_ms": outliers_ms,
        "root_cause_ms": root_cause_ms,
        "outliers_devices": [r[0] for r in outliers[:100]],
        "root_cause_top": [str(v) for v in root_cause[0][:2]],
        "duckdb": duckdb.__version__,
    }))


if __name__ == "__main__":
    main()
