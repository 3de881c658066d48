//! Plans made once and run micro-batch after micro-batch: a query is planned over an empty
//! in-memory input, and each run puts the batch's rows in place of that input's scan. Planning
//! SQL takes about a millisecond; running a small batch through a ready plan a fraction of it.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::catalog::TableProvider;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::physical_plan::ExecutionPlan;
use fleetlake_zones::TableId;

use crate::{Error, Result};

/// Whether two lists name the same tables with the same providers (a reference table that got
/// a new Delta version has a new provider).
pub(crate) fn same_tables(
    a: &[(TableId, Arc<dyn TableProvider>)],
    b: &[(TableId, Arc<dyn TableProvider>)],
) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((x, px), (y, py))| x == y && Arc::ptr_eq(px, py))
}

/// `plan` with the scans of the (empty) input table — in-memory scans of `schema` — reading
/// `rows` instead, and every node's run state reset (a hash join keeps its build side across
/// runs otherwise, even when made anew with other children). A plan without such a scan (the
/// optimizer found its result does not depend on the input) runs as it is.
pub(crate) fn with_rows(
    plan: &Arc<dyn ExecutionPlan>,
    schema: &SchemaRef,
    rows: RecordBatch,
) -> Result<Arc<dyn ExecutionPlan>> {
    let plan = plan
        .clone()
        .transform_up(|node| {
            let memory = node.downcast_ref::<DataSourceExec>().and_then(|d| {
                d.data_source()
                    .downcast_ref::<MemorySourceConfig>()
                    .filter(|m| m.original_schema().fields() == schema.fields())
            });
            match memory {
                Some(m) => {
                    let scan = MemorySourceConfig::try_new_exec(
                        &[vec![rows.clone()]],
                        schema.clone(),
                        m.projection().clone(),
                    )?;
                    Ok(Transformed::yes(scan as Arc<dyn ExecutionPlan>))
                }
                None => Ok(Transformed::no(node)),
            }
        })
        .map_err(Error::Execution)?
        .data;
    datafusion::physical_plan::execution_plan::reset_plan_states(plan).map_err(Error::Execution)
}
