//! Every DataFusion session fleetlake makes — ad-hoc queries, pipelines and their expectations,
//! window tables and rules — is made here, so each has the same functions: DataFusion's own,
//! fleetlake's anomaly functions ([`crate::anomaly`]) and `nats_partition` ([`nats_partition_udf`]).

use datafusion::execution::{FunctionRegistry, SessionStateBuilder};
use datafusion::prelude::{SessionConfig, SessionContext};

/// A session with `config`, DataFusion's default features and fleetlake's functions.
pub fn context(config: SessionConfig) -> SessionContext {
    context_with_runtime(config, Default::default())
}

/// [`context`] with its own runtime (memory pool, disk manager).
pub fn context_with_runtime(
    config: SessionConfig,
    runtime: std::sync::Arc<datafusion::execution::runtime_env::RuntimeEnv>,
) -> SessionContext {
    SessionContext::new_with_state(with_functions(
        SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_default_features()
            .build(),
    ))
}

/// A session for one ad-hoc query whose memory is `pool` ([`crate::memory`]): no spilling to
/// disk, window operators bounded by the pool ([`crate::memory::BoundBuffering`]) and the
/// amplifying scalar functions reserving their output first ([`crate::memory::sized_functions`]).
pub fn query_context(
    config: SessionConfig,
    pool: std::sync::Arc<crate::memory::QueryPool>,
) -> crate::Result<SessionContext> {
    use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
    let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
        .with_memory_pool(pool.clone())
        .with_disk_manager_builder(
            DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
        )
        .build_arc()
        .map_err(|e| crate::Error::Internal(e.to_string()))?;
    let mut state = with_functions(
        SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_default_features()
            .with_physical_optimizer_rule(std::sync::Arc::new(crate::memory::BoundBuffering))
            .build(),
    );
    for f in crate::memory::sized_functions(&state, pool) {
        state
            .register_udf(std::sync::Arc::new(f))
            .expect("registering a scalar function cannot fail");
    }
    Ok(SessionContext::new_with_state(state))
}

/// `state` with fleetlake's functions registered.
fn with_functions(
    mut state: datafusion::execution::SessionState,
) -> datafusion::execution::SessionState {
    for f in crate::anomaly::window_functions() {
        state
            .register_udwf(std::sync::Arc::new(f))
            .expect("registering a window function cannot fail");
    }
    for f in crate::anomaly::aggregate_functions() {
        state
            .register_udaf(std::sync::Arc::new(f))
            .expect("registering an aggregate function cannot fail");
    }
    state
        .register_udf(std::sync::Arc::new(nats_partition_udf()))
        .expect("registering a scalar function cannot fail");
    state
}

/// `nats_partition(subject VARCHAR, partitions BIGINT) -> BIGINT`: the partition (0-based) NATS
/// maps `subject` to among `partitions` ([`crate::hash::nats_partition`]); NULL when either is
/// NULL or `partitions` is not positive. Which instance of a cluster consumes a message:
/// `SELECT nats_partition(subject, 6) FROM raw.telemetry`.
pub fn nats_partition_udf() -> datafusion::logical_expr::ScalarUDF {
    use datafusion::arrow::array::{Array, AsArray, Int64Array};
    use datafusion::arrow::datatypes::{DataType, Int64Type};
    use datafusion::logical_expr::{ColumnarValue, Volatility, create_udf};
    let fun = |args: &[ColumnarValue]| -> datafusion::error::Result<ColumnarValue> {
        let rows = args
            .iter()
            .find_map(|a| match a {
                ColumnarValue::Array(a) => Some(a.len()),
                ColumnarValue::Scalar(_) => None,
            })
            .unwrap_or(1);
        let arrays = ColumnarValue::values_to_arrays(args)?;
        let subjects = arrays[0].as_string::<i32>();
        let counts = arrays[1].as_primitive::<Int64Type>();
        let out: Int64Array = (0..rows)
            .map(|i| {
                if subjects.is_null(i) || counts.is_null(i) {
                    return None;
                }
                let n = u32::try_from(counts.value(i)).ok().filter(|n| *n > 0)?;
                Some(crate::hash::nats_partition(subjects.value(i), n) as i64)
            })
            .collect();
        if args.iter().all(|a| matches!(a, ColumnarValue::Scalar(_))) {
            return Ok(ColumnarValue::Scalar(
                datafusion::scalar::ScalarValue::try_from_array(&out, 0)?,
            ));
        }
        Ok(ColumnarValue::Array(std::sync::Arc::new(out)))
    };
    create_udf(
        "nats_partition",
        vec![DataType::Utf8, DataType::Int64],
        DataType::Int64,
        Volatility::Immutable,
        std::sync::Arc::new(fun),
    )
}
