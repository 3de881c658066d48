"""Open fleetlake's Delta tables with other readers: the deltalake Python package and DuckDB.

Usage: read_tables.py LAKE_URI TABLE [TABLE ...]
Storage options come from the AWS_* environment variables. Prints one JSON object:
{"<table>": {"deltalake_rows": N, "duckdb_rows": N, "version": V, "columns": [...]}, ...}
"""

import json
import os
import sys

import duckdb
import pyarrow.dataset  # noqa: F401  (DuckDB scans the dataset deltalake hands it)
from deltalake import DeltaTable


def main() -> None:
    lake, tables = sys.argv[1].rstrip("/"), sys.argv[2:]
    options = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    out = {}
    for table in tables:
        zone, name = table.split(".")
        dt = DeltaTable(f"{lake}/{zone}/{name}", storage_options=options or None)
        dataset = dt.to_pyarrow_dataset()
        con = duckdb.connect()
        con.register("t", dataset)
        duck_rows = con.execute("SELECT count(*) FROM t").fetchone()[0]
        if lake.startswith("file://") or lake.startswith("/"):
            # A local lake: DuckDB also reads the live Parquet files straight from the Delta log.
            files = [u.removeprefix("file://") for u in dt.file_uris()]
            direct = con.execute("SELECT count(*) FROM read_parquet(?)", [files]).fetchone()[0]
            assert direct == duck_rows, (table, direct, duck_rows)
        out[table] = {
            "deltalake_rows": dataset.count_rows(),
            "duckdb_rows": duck_rows,
            "version": dt.version(),
            "columns": [f.name for f in dt.schema().fields],
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
