"""Writes the expected rows of the anomaly .slt files from their definitions, computed with
Python's `statistics` module (an implementation independent of fleetlake's):

    python3 sql/tests/anomaly/oracle.py   # rewrites sql/tests/anomaly/*.slt

Each function's definition is in sql/src/anomaly.rs and the README ("Anomaly functions").
"""
import math
import os
import statistics as st

HERE = os.path.dirname(os.path.abspath(__file__))
MAD_TO_SIGMA = 1.4826
MEAN_AD_TO_SIGMA = 1.253314


def fmt(x):
    """A value as the test harness prints it (Rust's Display for f64, NULL, booleans)."""
    if x is None:
        return "NULL"
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, str):
        return x
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    x = round(x, 4) + 0.0
    if x == int(x):
        return str(int(x))
    return repr(x)


def ratio(num, spread):
    if spread == 0:
        return 0.0 if num == 0 else math.copysign(math.inf, num)
    return num / spread


def zscore(x, base):
    if x is None or len(base) < 2:
        return None
    return ratio(x - st.mean(base), st.stdev(base))


def robust(x, base):
    if x is None or len(base) < 3:
        return None
    med = st.median(base)
    mad = st.median([abs(v - med) for v in base])
    if mad > 0:
        return ratio(x - med, MAD_TO_SIGMA * mad)
    return ratio(x - med, MEAN_AD_TO_SIGMA * st.mean([abs(v - med) for v in base]))


def iqr(x, base):
    if x is None or len(base) < 4:
        return None
    q1, _, q3 = st.quantiles(base, n=4, method="inclusive")
    if x > q3:
        return ratio(x - q3, q3 - q1)
    if x < q1:
        return ratio(x - q1, q3 - q1)
    return 0.0


def pct_rank(x, base):
    if x is None or not base:
        return None
    below = sum(1 for v in base if v < x)
    ties = sum(1 for v in base if v == x)
    return (below + 0.5 * ties) / len(base)


def spike(x, base, k):
    z = robust(x, base)
    if z is None:
        return None
    return "spike" if z > k else "dip" if z < -k else "none"


def welch(before, after):
    if len(before) < 2 or len(after) < 2:
        return None
    se = math.sqrt(st.variance(before) / len(before) + st.variance(after) / len(after))
    return ratio(st.mean(after) - st.mean(before), se)


def ewma(xs, alpha):
    mean, var, seen, out = None, 0.0, 0, []
    for x in xs:
        if x is None:
            out.append((None, None))
            continue
        z = ratio(x - mean, math.sqrt(var)) if mean is not None and seen >= 2 else None
        if mean is None:
            mean = x
        else:
            d = x - mean
            mean = mean + alpha * d
            var = (1 - alpha) * (var + alpha * d * d)
        seen += 1
        out.append((mean, z))
    return out


def nonnull(vs):
    return [v for v in vs if v is not None]


def frame(vs, i, preceding, following):
    """ROWS BETWEEN preceding PRECEDING AND following FOLLOWING (negative: before the row)."""
    return vs[max(0, i - preceding): max(0, i + following + 1)]


def table(name, columns, rows):
    def lit(v):
        if v is None:
            return "NULL"
        if isinstance(v, str):
            return f"'{v}'"
        return repr(v)
    body = ",\n".join("  (" + ", ".join(lit(v) for v in r) + ")" for r in rows)
    return f"statement ok\nCREATE TABLE {name} ({columns}) AS VALUES\n{body}\n"


def query(types, sql, rows):
    out = "\n".join(" ".join(fmt(v) for v in r) for r in rows)
    return f"query {types}\n{sql}\n----\n{out}\n"


def write(name, parts):
    with open(os.path.join(HERE, name), "w") as f:
        f.write("\n".join(parts))


# ---------------------------------------------------------------------------------------------
# series.slt
A = [10.0, 11.0, 9.0, 10.0, 12.0, 10.0, 30.0, 10.0, 11.0, 9.0]
B = [1.0, 1.1, 0.9, 1.0, 1.05, 5.0, 5.1, 4.9, 5.0, 5.05]
rows = [("a", t + 1, v) for t, v in enumerate(A)] + [("b", t + 1, v) for t, v in enumerate(B)]
series = [
    "# Per-series scores: each reading of a device against the same device's history.\n"
    "# Device a reads about 10 with one spike (30) at ts 7; device b shifts level from 1 to 5 at ts 6.\n"
    "# Frames of ROWS BETWEEN 4 PRECEDING AND 1 PRECEDING compare a reading with the four before it,\n"
    "# itself excluded, so a spike does not hide in its own baseline.\n",
    table("readings", "device_id VARCHAR, ts BIGINT, v DOUBLE", rows),
    "# zscore: (v - mean) / sample stddev of the frame; NULL with fewer than 2 values in the frame.\n"
    "# robust_zscore: (v - median) / (1.4826 * MAD); NULL with fewer than 3.\n"
    "# iqr_score: 0 inside [Q1, Q3], else the distance beyond the nearer quartile in IQRs; NULL under 4.\n"
    "# spike(v, k): 'spike' / 'dip' when the robust z is beyond +k / -k, else 'none'.",
    query(
        "IRRRRT",
        "SELECT ts,\n"
        "  round(zscore(v) OVER w, 4),\n"
        "  round(robust_zscore(v) OVER w, 4),\n"
        "  round(iqr_score(v) OVER w, 4),\n"
        "  round(percentile_rank(v) OVER w, 4),\n"
        "  spike(v, 3.5) OVER w\n"
        "FROM readings WHERE device_id = 'a'\n"
        "WINDOW w AS (PARTITION BY device_id ORDER BY ts ROWS BETWEEN 4 PRECEDING AND 1 PRECEDING)\n"
        "ORDER BY ts",
        [
            (
                i + 1,
                zscore(A[i], frame(A, i, 4, -1)),
                robust(A[i], frame(A, i, 4, -1)),
                iqr(A[i], frame(A, i, 4, -1)),
                pct_rank(A[i], frame(A, i, 4, -1)),
                spike(A[i], frame(A, i, 4, -1), 3.5),
            )
            for i in range(len(A))
        ],
    ),
    "# level_shift: Welch's t of the current and following rows of the frame against the rows before\n"
    "# the current one. Its peak is at the first reading of the new level (ts 6); one spike (device a,\n"
    "# ts 7) is diluted. NULL when either side has fewer than 2 values.",
    query(
        "TIR",
        "SELECT device_id, ts,\n"
        "  round(level_shift(v) OVER (PARTITION BY device_id ORDER BY ts ROWS BETWEEN 3 PRECEDING AND 2 FOLLOWING), 4)\n"
        "FROM readings ORDER BY device_id, ts",
        [
            (d, i + 1, welch(frame(S, i, 3, -1), S[i: i + 3]))
            for d, S in (("a", A), ("b", B))
            for i in range(len(S))
        ],
    ),
    "# ewma(v, alpha): the exponentially weighted mean after the reading (Finch 2009);\n"
    "# ewma_zscore(v, alpha): the reading against the mean and deviation before it (NULL for the\n"
    "# first two readings: no deviation yet). They follow ORDER BY and ignore the frame.",
    query(
        "IRR",
        "SELECT ts, round(ewma(v, 0.5) OVER s, 4), round(ewma_zscore(v, 0.5) OVER s, 4)\n"
        "FROM readings WHERE device_id = 'a'\n"
        "WINDOW s AS (PARTITION BY device_id ORDER BY ts)\n"
        "ORDER BY ts",
        [(i + 1, m, z) for i, (m, z) in enumerate(ewma(A, 0.5))],
    ),
]
write("series.slt", series)

# ---------------------------------------------------------------------------------------------
# cohort.slt
X = [4.0, 4.2, 3.9, 4.1, 4.0, 4.3, 3.8, 9.5]
Y = [2.0, 6.0, 3.0, 7.0, 1.0, 5.0, 8.0, 4.0]
Z = [4.0, 20.0]
devices = (
    [(f"x{i}", "m1", "rev-A", v) for i, v in enumerate(X)]
    + [(f"y{i}", "m1", "rev-B", v) for i, v in enumerate(Y)]
    + [(f"z{i}", "m2", "rev-A", v) for i, v in enumerate(Z)]
)
cohort_of = {("m1", "rev-A"): X, ("m1", "rev-B"): Y, ("m2", "rev-A"): Z}
fleet = X + Y + Z


def outlier(x, base, min_size, k=3.5):
    z = robust(x, base)
    return len(base) >= min_size and z is not None and abs(z) > k


cohort = [
    "# Per-cohort scores: each device's value (say, its mean temperature this hour) against the\n"
    "# members of its cohort (model x hardware revision). A window without ORDER BY is the whole\n"
    "# partition: the cohort, the device itself included.\n"
    "# Cohort m1/rev-A is tight with one drifting device (x7); m1/rev-B is noisy but healthy;\n"
    "# m2/rev-A has two devices, too few to call either an outlier.\n",
    table("fleet", "device_id VARCHAR, model VARCHAR, hw_rev VARCHAR, avg_temp DOUBLE", devices),
    "# cohort_outlier(v, min_size[, threshold = 3.5]): |robust z| > threshold in a cohort of at least\n"
    "# min_size members (min_size >= 3); false in a smaller cohort; NULL for a NULL value.",
    query(
        "TTRRBB",
        "SELECT device_id, hw_rev,\n"
        "  round(robust_zscore(avg_temp) OVER c, 4),\n"
        "  round(percentile_rank(avg_temp) OVER c, 4),\n"
        "  cohort_outlier(avg_temp, 3) OVER c,\n"
        "  cohort_outlier(avg_temp, 3) OVER ()\n"
        "FROM fleet\n"
        "WINDOW c AS (PARTITION BY model, hw_rev)\n"
        "ORDER BY device_id",
        sorted(
            (
                d,
                hw,
                robust(v, cohort_of[(m, hw)]),
                pct_rank(v, cohort_of[(m, hw)]),
                outlier(v, cohort_of[(m, hw)], 3),
                outlier(v, fleet, 3),
            )
            for d, m, hw, v in devices
        ),
    ),
    "# Against the whole fleet (the last column) the noisy cohort's extremes would look odd and the\n"
    "# small cohort's 20.0 is flagged; within their cohorts only x7 is.\n\n"
    "# mad(v): the median absolute deviation, unscaled; an aggregate, and a window function.",
    query(
        "TTRRI",
        "SELECT model, hw_rev, round(median(avg_temp), 4), round(mad(avg_temp), 4), count(*)\n"
        "FROM fleet GROUP BY model, hw_rev ORDER BY model, hw_rev",
        [
            (m, hw, st.median(vs), st.median([abs(v - st.median(vs)) for v in vs]), len(vs))
            for (m, hw), vs in sorted(cohort_of.items())
        ],
    ),
    query(
        "TR",
        "SELECT device_id, round(mad(avg_temp) OVER (PARTITION BY model ORDER BY device_id ROWS BETWEEN 2 PRECEDING AND CURRENT ROW), 4)\n"
        "FROM fleet WHERE model = 'm2' OR device_id IN ('x0', 'x1', 'x2', 'x3') ORDER BY device_id",
        [
            (d, st.median([abs(v - st.median(w)) for v in w]))
            for d, w in (
                ("x0", X[0:1]), ("x1", X[0:2]), ("x2", X[0:3]), ("x3", X[1:4]),
                ("z0", Z[0:1]), ("z1", Z[0:2]),
            )
        ],
    ),
]
write("cohort.slt", cohort)

# ---------------------------------------------------------------------------------------------
# edges.slt
F = [5.0, 5.0, 5.0, 5.0, 5.0, 9.0, None, 5.0]
edge_rows = [("f", t + 1, v) for t, v in enumerate(F)]
edges = [
    "# NULLs, zero spread and bad arguments.\n"
    "# Device f reads exactly 5.0 four times, then 9.0, then NULL, then 5.0.\n",
    table("flat", "device_id VARCHAR, ts BIGINT, v DOUBLE", edge_rows),
    "# Zero spread: 0 when the reading equals the centre, +/-infinity otherwise, so abs(score) > 3\n"
    "# holds when a flat-lined sensor moves. A NULL reading scores NULL; NULLs in the frame are\n"
    "# skipped (ts 8's frame holds 5, 5, 9 and NULL: three values).",
    query(
        "IRRRT",
        "SELECT ts,\n"
        "  round(zscore(v) OVER w, 4),\n"
        "  round(robust_zscore(v) OVER w, 4),\n"
        "  round(iqr_score(v) OVER w, 4),\n"
        "  spike(v, 3) OVER w\n"
        "FROM flat\n"
        "WINDOW w AS (ORDER BY ts ROWS BETWEEN 4 PRECEDING AND 1 PRECEDING)\n"
        "ORDER BY ts",
        [
            (
                i + 1,
                zscore(F[i], nonnull(frame(F, i, 4, -1))),
                robust(F[i], nonnull(frame(F, i, 4, -1))),
                iqr(F[i], nonnull(frame(F, i, 4, -1))),
                spike(F[i], nonnull(frame(F, i, 4, -1)), 3),
            )
            for i in range(len(F))
        ],
    ),
    "# Integers are taken as doubles.",
    query(
        "IR",
        "SELECT ts, round(zscore(ts) OVER (ORDER BY ts ROWS BETWEEN 2 PRECEDING AND 1 PRECEDING), 4)\n"
        "FROM flat WHERE ts <= 4 ORDER BY ts",
        [(t, zscore(float(t), [float(p) for p in range(max(1, t - 2), t)])) for t in range(1, 5)],
    ),
    "# Identical values have zero spread exactly, though their floating-point sum is no multiple\n"
    "# of them (0.1 + 0.1 + 0.1 != 0.3).",
    table("tenth", "ts BIGINT, v DOUBLE", [(t, 0.1) for t in range(1, 6)]),
    query(
        "IRR",
        "SELECT ts, zscore(v) OVER w, level_shift(v) OVER (ORDER BY ts ROWS BETWEEN 2 PRECEDING AND 2 FOLLOWING)\n"
        "FROM tenth WINDOW w AS (ORDER BY ts ROWS BETWEEN 4 PRECEDING AND 1 PRECEDING) ORDER BY ts",
        [
            (t, zscore(0.1, [0.1] * min(t - 1, 4)),
             welch([0.1] * min(t - 1, 2), [0.1] * min(6 - t, 3)))
            for t in range(1, 6)
        ],
    ),
    "# An inverted frame is refused when the statement is planned (DataFusion's check).",
    "statement error Invalid window frame: start bound \\(1 PRECEDING\\) cannot be larger than end bound \\(3 PRECEDING\\)\n"
    "SELECT ts, level_shift(v) OVER (ORDER BY ts ROWS BETWEEN 1 PRECEDING AND 3 PRECEDING) FROM tenth\n",
    "# Parameters must be constants in range, and say so.",
    "statement error ewma: alpha is 1.5, expected a smoothing factor in \\(0, 1\\]\n"
    "SELECT ewma(v, 1.5) OVER (ORDER BY ts) FROM flat\n",
    "statement error spike: threshold must be a constant\n"
    "SELECT spike(v, v) OVER (ORDER BY ts) FROM flat\n",
    "statement error cohort_outlier: min_size is 2, expected a whole number of at least 3\n"
    "SELECT cohort_outlier(v, 2) OVER () FROM flat\n",
    "statement error cohort_outlier: threshold is -1, expected a robust z above 0\n"
    "SELECT cohort_outlier(v, 3, -1) OVER () FROM flat\n",
]
write("edges.slt", edges)
