//! Every DataFusion session fleetlake makes — ad-hoc queries, pipelines and their expectations,
//! window tables and rules — is made here, so each has the same functions: DataFusion's own and
//! fleetlake's anomaly functions ([`crate::anomaly`]).

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
    let mut state = SessionStateBuilder::new()
        .with_config(config)
        .with_runtime_env(runtime)
        .with_default_features()
        .build();
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
    SessionContext::new_with_state(state)
}
