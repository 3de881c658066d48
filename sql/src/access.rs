//! Who may read what: the zones and tables a caller may name in SQL, and the tenants whose rows
//! it may see.
//!
//! [`Access`] is checked by [`crate::QueryEngine`] for every table a statement names, before
//! planning. For a caller bound to tenants, each tenant-bearing table is registered wrapped in a
//! [`TenantScoped`] provider: its scan reads the table and keeps only the rows whose tenant column
//! is one of the caller's tenants, inside one [`SealedScan`] node that the optimizer cannot see into
//! and that accepts no filter, projection, limit or statistics from above. The caller's own
//! predicates therefore run only on its own rows, wherever they appear (CTEs, subqueries, joins,
//! `UNION`, window functions): no count, minimum, error message or timing of another tenant's
//! rows can reach it. Tables without the tenant column are refused to bound callers unless they
//! are declared tenant-free (a firmware catalogue, say).

use std::fmt;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::DFSchema;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::TableType;
use datafusion::error::Result as DfResult;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, col, lit};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, PlanProperties,
};
use fleetlake_zones::{TableId, Zone};

use crate::{Error, Result};

/// What one caller may read. [`Access::full`] is everything (the CLI, internal callers).
#[derive(Debug, Clone)]
pub struct Access {
    /// Who is asking, for error messages ("token grafana (analyst)").
    pub who: String,
    /// The zones whose tables may be named.
    pub zones: Vec<Zone>,
    /// Tables refused although their zone is readable (`final.audit` for all but admins).
    pub hidden: Vec<TableId>,
    /// `Some`: only rows whose [`Access::tenant_column`] is one of these are visible, and tables
    /// without that column are refused unless listed in [`Access::tenant_free`].
    pub tenants: Option<Vec<String>>,
    /// The column naming a row's tenant (`tenant`).
    pub tenant_column: String,
    /// Tables holding no tenant's rows, readable in full by a caller bound to tenants.
    pub tenant_free: Vec<TableId>,
    /// The most memory one query's operators may reserve (DataFusion's memory pool), in bytes;
    /// a query needing more fails with `query_memory_limit`.
    pub memory_limit: Option<usize>,
    /// The most rows an answer may hold; a query producing more fails with `query_row_limit`.
    pub max_rows: Option<usize>,
}

impl Access {
    /// Every zone, every row, no limits.
    pub fn full() -> Self {
        Self {
            who: "local".into(),
            zones: Zone::ALL.to_vec(),
            hidden: Vec::new(),
            tenants: None,
            tenant_column: "tenant".into(),
            tenant_free: Vec::new(),
            memory_limit: None,
            max_rows: None,
        }
    }

    /// Whether this caller sees only some tenants' rows.
    pub fn is_tenant_bound(&self) -> bool {
        self.tenants.is_some()
    }

    /// Refuses a table outside the caller's zones or hidden from it.
    pub fn check_table(&self, id: &TableId) -> Result<()> {
        if !self.zones.contains(&id.zone) {
            let zones: Vec<&str> = self.zones.iter().map(|z| z.as_str()).collect();
            return Err(Error::Forbidden(format!(
                "{id}: {} may read the {} zones only",
                self.who,
                zones.join(", ")
            )));
        }
        // Compared without case: on a case-insensitive file system final."AUDIT" is the same
        // folder as final.audit.
        let name = id.to_string().to_lowercase();
        if self
            .hidden
            .iter()
            .any(|h| h.to_string().to_lowercase() == name)
        {
            return Err(Error::Forbidden(format!(
                "{id}: {} may not read this table",
                self.who
            )));
        }
        Ok(())
    }

    /// `provider` as this caller may see it: unchanged for a caller not bound to tenants or a
    /// tenant-free table; otherwise wrapped in [`TenantScoped`]. A bound caller is refused a
    /// table without the tenant column that is not declared tenant-free.
    pub fn scope(
        &self,
        id: &TableId,
        provider: Arc<dyn TableProvider>,
    ) -> Result<Arc<dyn TableProvider>> {
        let Some(tenants) = &self.tenants else {
            return Ok(provider);
        };
        if self
            .tenant_free
            .iter()
            .any(|t| t.to_string().eq_ignore_ascii_case(&id.to_string()))
        {
            return Ok(provider);
        }
        let Ok(column) = provider.schema().index_of(&self.tenant_column) else {
            return Err(Error::Forbidden(format!(
                "{id} has no {} column, so {} (bound to tenants) may not read it; an operator can declare it tenant-free (auth.tenant_free_tables)",
                self.tenant_column, self.who
            )));
        };
        Ok(Arc::new(TenantScoped {
            inner: provider,
            column,
            column_name: self.tenant_column.clone(),
            tenants: tenants.clone(),
        }))
    }
}

/// A table whose scan yields only the rows of some tenants (see the module's documentation).
#[derive(Debug)]
pub struct TenantScoped {
    inner: Arc<dyn TableProvider>,
    /// Index of the tenant column in the table's schema.
    column: usize,
    column_name: String,
    tenants: Vec<String>,
}

#[async_trait::async_trait]
impl TableProvider for TenantScoped {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    /// No filter of the caller's is pushed into the scan: it would run on every tenant's rows.
    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        Ok(vec![
            TableProviderFilterPushDown::Unsupported;
            filters.len()
        ])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let schema = self.inner.schema();
        let wanted: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..schema.fields().len()).collect(),
        };
        // The inner scan reads the wanted columns and the tenant column.
        let mut read = wanted.clone();
        if !read.contains(&self.column) {
            read.push(self.column);
        }
        let list: Vec<Expr> = self.tenants.iter().map(|t| lit(t.as_str())).collect();
        let predicate = col(self.column_name.as_str()).in_list(list, false);
        // Our own predicate may prune files (it cannot fail on any row); it is applied below
        // in any case.
        let scan = self
            .inner
            .scan(state, Some(&read), std::slice::from_ref(&predicate), None)
            .await?;
        let df_schema = DFSchema::try_from(scan.schema().as_ref().clone())?;
        let physical = state.create_physical_expr(predicate, &df_schema)?;
        let filtered: Arc<dyn ExecutionPlan> =
            Arc::new(FilterExec::try_new(physical, Arc::clone(&scan))?);
        let exprs: Vec<(Arc<dyn PhysicalExpr>, String)> = wanted
            .iter()
            .map(|&i| {
                let name = schema.field(i).name().clone();
                let at = read
                    .iter()
                    .position(|&r| r == i)
                    .expect("read holds wanted");
                let e: Arc<dyn PhysicalExpr> = Arc::new(
                    datafusion::physical_expr::expressions::Column::new(&name, at),
                );
                (e, name)
            })
            .collect();
        let projected = Arc::new(ProjectionExec::try_new(exprs, filtered)?);
        Ok(Arc::new(SealedScan::new(projected)))
    }
}

/// A finished plan shown to the optimizer as a leaf: nothing from above (filters, projections,
/// limits, dynamic filters) is pushed into it, and it reports no statistics.
#[derive(Debug)]
pub struct SealedScan {
    inner: Arc<dyn ExecutionPlan>,
    properties: Arc<PlanProperties>,
}

impl SealedScan {
    fn new(inner: Arc<dyn ExecutionPlan>) -> Self {
        let properties = Arc::new(PlanProperties::new(
            inner.equivalence_properties().clone(),
            inner.output_partitioning().clone(),
            inner.pipeline_behavior(),
            inner.boundedness(),
        ));
        Self { inner, properties }
    }
}

impl DisplayAs for SealedScan {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "TenantScopedScan")
    }
}

impl ExecutionPlan for SealedScan {
    fn name(&self) -> &str {
        "TenantScopedScan"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    /// Hidden from the optimizer, the inner plan must still be reset like any other before it
    /// runs again: a recursive CTE re-executes its recursive term once per step
    /// (`RecursiveQueryExec` calls `reset_plan_states`), and a scan keeps per-execution state
    /// (the files still to read). Without this, every step after the first read nothing.
    fn reset_state(self: Arc<Self>) -> DfResult<Arc<dyn ExecutionPlan>> {
        let inner =
            datafusion::physical_plan::execution_plan::reset_plan_states(Arc::clone(&self.inner))?;
        Ok(Arc::new(Self {
            inner,
            properties: Arc::clone(&self.properties),
        }))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        self.inner.execute(partition, context)
    }
}
