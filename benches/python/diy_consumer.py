"""The do-it-yourself baseline of the benchmark suite (`benches/src/suite.rs`).

What a data engineer would write instead of fleetlake: a nats-py pull consumer that decodes each
envelope reading (JSON: device_id, seq, ts in epoch milliseconds or RFC 3339, temperature, humidity, battery,
fw, hw), drops replays of a (device_id, seq) it has seen, skips what does not decode, and appends
to one Delta table with the `deltalake` package every `--batch-rows` rows, acknowledging
(AckPolicy.ALL: the last message acks all before it) only after the append. No raw zone, no
quarantine table, no exactly-once across a crash (a crash between append and ack appends twice):
it does less than fleetlake, so the comparison flatters it.

    python diy_consumer.py NATS_URL STREAM TABLE_PATH MESSAGES [--batch-rows 50000]

Consumes until MESSAGES messages were read, then prints one JSON line: messages, rows,
duplicates, malformed, seconds, cpu_seconds (of this process).
"""

import argparse
import asyncio
import json
import time
from datetime import datetime

import nats
import pyarrow as pa
from deltalake import write_deltalake
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

SCHEMA = pa.schema(
    [
        ("device_id", pa.string()),
        ("seq", pa.int64()),
        ("ts", pa.timestamp("ms", tz="UTC")),
        ("fw", pa.string()),
        ("hw", pa.string()),
        ("temperature", pa.float64()),
        ("humidity", pa.float64()),
        ("battery", pa.float64()),
    ]
)
COLUMNS = [f.name for f in SCHEMA]


def decode(payload):
    """One reading as a tuple of COLUMNS, or None when it is not a reading."""
    try:
        v = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(v, dict):
        return None
    device, seq, ts = v.get("device_id"), v.get("seq"), v.get("ts")
    if not isinstance(device, str) or not isinstance(seq, int):
        return None
    if isinstance(ts, str):  # half the fleet sends RFC 3339 text, the rest epoch milliseconds
        try:
            ts = datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000
        except ValueError:
            return None
    elif not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return None
    row = [device, seq, round(ts), v.get("fw"), v.get("hw")]
    for name in ("temperature", "humidity", "battery"):
        x = v.get(name)
        if x is not None and not isinstance(x, (int, float)):
            return None
        row.append(x)
    return row


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("stream")
    p.add_argument("table")
    p.add_argument("messages", type=int)
    p.add_argument("--batch-rows", type=int, default=50_000)
    p.add_argument("--fetch", type=int, default=1000)
    a = p.parse_args()

    started = time.monotonic()
    nc = await nats.connect(a.url)
    js = nc.jetstream()
    sub = await js.pull_subscribe(
        "",
        durable="diy",
        stream=a.stream,
        config=ConsumerConfig(
            ack_policy=AckPolicy.ALL,
            deliver_policy=DeliverPolicy.ALL,
            max_ack_pending=2 * a.batch_rows,
        ),
    )
    seen = set()
    columns = [[] for _ in COLUMNS]
    read = rows = duplicates = malformed = 0
    last = None

    def flush():
        nonlocal columns
        if columns[0]:
            table = pa.Table.from_arrays(
                [pa.array(c, type=f.type) for c, f in zip(columns, SCHEMA)], schema=SCHEMA
            )
            write_deltalake(a.table, table, mode="append")
            columns = [[] for _ in COLUMNS]

    while read < a.messages:
        try:
            msgs = await sub.fetch(a.fetch, timeout=1)
        except nats.errors.TimeoutError:
            continue
        for m in msgs:
            read += 1
            last = m
            row = decode(m.data)
            if row is None:
                malformed += 1
                continue
            key = (row[0], row[1])
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            rows += 1
            for c, x in zip(columns, row):
                c.append(x)
        if len(columns[0]) >= a.batch_rows or read >= a.messages:
            flush()
            await last.ack()
    await nc.flush()
    await nc.close()
    print(
        json.dumps(
            {
                "messages": read,
                "rows": rows,
                "duplicates": duplicates,
                "malformed": malformed,
                "seconds": round(time.monotonic() - started, 3),
                "cpu_seconds": round(time.process_time(), 3),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
