//! Every DataFusion session fleetlake makes — ad-hoc queries, pipelines and their expectations,
//! window tables and rules — is made here, so each has the same functions: DataFusion's own and
//! fleetlake's anomaly functions ([`crate::anomaly`]).

use datafusion::execution::{FunctionRegistry, SessionStateBuilder};
use datafusion::prelude::{SessionConfig, SessionContext};

/// A session with `config`, DataFusion's default features and fleetlake's functions.
pub fn context(config: SessionConfig) -> SessionContext {
    let mut state = SessionStateBuilder::new()
        .with_config(config)
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
