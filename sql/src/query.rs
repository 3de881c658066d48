//! [`QueryEngine`]: read-only SQL over the zones, for the HTTP API and `fleetlake query`.
//!
//! Each query gets a fresh DataFusion session in which only the tables it names are registered,
//! each at its latest Delta version, so an answer always reflects the last commit and one slow
//! query never pins old table versions for the next.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::catalog::MemorySchemaProvider;
use datafusion::common::TableReference;
use datafusion::error::DataFusionError;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::Statement;
use fleetlake_zones::{Lake, TableId, Zone};

use crate::access::Access;
use crate::memory::{EngineMemory, QueryPool};
use crate::{Error, Result};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};

/// The answer to a query: its schema and batches. An answer from [`QueryEngine::query_with`]
/// keeps its memory reserved in the query's pool (and the engine's budget) until the last clone
/// is dropped, so an answer being encoded still counts.
#[derive(Debug, Clone)]
pub struct QueryResult {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    _held: Option<Arc<MemoryReservation>>,
}

impl QueryResult {
    /// An answer of `batches`, holding no reservation.
    pub fn new(schema: SchemaRef, batches: Vec<RecordBatch>) -> Self {
        Self {
            schema,
            batches,
            _held: None,
        }
    }

    /// The same rows' reservation carried over to `batches` (a part of them).
    pub fn with_batches(self, batches: Vec<RecordBatch>) -> Self {
        Self { batches, ..self }
    }

    pub fn row_count(&self) -> usize {
        self.batches.iter().map(|b| b.num_rows()).sum()
    }
}

/// Tables that live in the engine's memory rather than the lake (`final.device_state`): each
/// query that names one gets the provider of the moment.
pub trait LiveTables: std::fmt::Debug + Send + Sync {
    /// A provider of `id` as it is now; `None` if `id` is not a live table.
    fn provider(&self, id: &TableId)
    -> Option<Result<Arc<dyn datafusion::catalog::TableProvider>>>;

    /// The tables it answers for, listed by `SHOW TABLES` and `information_schema`.
    fn ids(&self) -> Vec<TableId>;
}

/// Plans and runs read-only SQL over the lake's zone tables (`usable.telemetry`, …) and any
/// [`LiveTables`].
#[derive(Debug, Clone)]
pub struct QueryEngine {
    lake: Lake,
    live: Option<Arc<dyn LiveTables>>,
    memory: Option<Arc<EngineMemory>>,
}

impl QueryEngine {
    pub fn new(lake: Lake) -> Self {
        Self {
            lake,
            live: None,
            memory: None,
        }
    }

    /// The same engine, every query of which also draws its memory from `memory`, the budget
    /// all queries share (`query.total_memory_mb`; see [`crate::memory`]).
    pub fn with_memory(mut self, memory: Arc<EngineMemory>) -> Self {
        self.memory = Some(memory);
        self
    }

    /// The budget all queries share, if one was set.
    pub fn memory(&self) -> Option<&Arc<EngineMemory>> {
        self.memory.as_ref()
    }

    /// The same engine, also answering for `live`'s tables (they take precedence over a Delta
    /// table of the same name).
    pub fn with_live(mut self, live: Arc<dyn LiveTables>) -> Self {
        self.live = Some(live);
        self
    }

    pub fn lake(&self) -> &Lake {
        &self.lake
    }

    fn context(&self, pool: Arc<QueryPool>) -> Result<SessionContext> {
        let config = SessionConfig::new()
            .with_information_schema(true)
            .with_default_catalog_and_schema("datafusion", "public");
        // A pool for each query within the engine's budget, and no spilling to disk: a query
        // that needs more fails with query_memory_limit rather than filling the disk.
        let ctx = crate::session::query_context(config, pool)?;
        let catalog = ctx.catalog("datafusion").expect("default catalog");
        for zone in Zone::ALL {
            catalog
                .register_schema(zone.as_str(), Arc::new(MemorySchemaProvider::new()))
                .expect("memory catalog accepts schemas");
        }
        Ok(ctx)
    }

    /// Runs one read-only statement with full access; see [`QueryEngine::query_with`].
    pub async fn query(&self, sql: &str) -> Result<QueryResult> {
        self.query_with(sql, &Access::full()).await
    }

    /// Runs one read-only statement as `access` allows. DDL, DML, `COPY` and statements such
    /// as `SET` are refused, and so is a statement beyond [`check_size`]'s limits. Each table
    /// the statement names is checked against `access` (`forbidden`, HTTP 403) and, for a caller
    /// bound to tenants, scoped to its tenants' rows ([`crate::access`]); such a caller may not
    /// `EXPLAIN` (a physical plan describes files holding other tenants' rows). The answer is
    /// collected up to `access.max_rows` (`query_row_limit`), with at most
    /// `access.memory_limit` bytes reserved by its operators (`query_memory_limit`).
    pub async fn query_with(&self, sql: &str, access: &Access) -> Result<QueryResult> {
        check_size(sql)?;
        let pool = QueryPool::new(access.memory_limit, self.memory.clone());
        let ctx = self.context(Arc::clone(&pool))?;
        let state = ctx.state();
        let statement = state
            .sql_to_statement(sql, &datafusion::config::Dialect::Generic)
            .map_err(|e| Error::Parse(strip(e)))?;
        refuse_writes(&statement)?;
        if access.is_tenant_bound() && is_explain(&statement) {
            return Err(Error::Forbidden(format!(
                "EXPLAIN is not available to {} (bound to tenants): a plan describes files that hold other tenants' rows",
                access.who
            )));
        }
        let references = state
            .resolve_table_references(&statement)
            .map_err(|e| Error::Plan(strip(e)))?;
        // SHOW TABLES, SHOW COLUMNS and information_schema list what is registered: every
        // table the caller may read is, for them.
        if references
            .iter()
            .any(|r| r.schema() == Some("information_schema"))
        {
            self.register_readable(&ctx, access).await?;
        }
        for reference in references {
            self.register(&ctx, &reference, access).await?;
        }
        let plan = state
            .statement_to_plan(statement)
            .await
            .map_err(|e| Error::Plan(strip(e)))?;
        datafusion::execution::context::SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false)
            .verify_plan(&plan)
            .map_err(|e| Error::ReadOnly(strip(e)))?;
        let frame = ctx
            .execute_logical_plan(plan)
            .await
            .map_err(|e| Error::Plan(strip(e)))?;
        let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
        let executed = |e: DataFusionError| {
            if !crate::error::is_resources_exhausted(&e) {
                Error::Execution(e)
            } else if pool.refused_by_engine() {
                Error::MemoryBusy(format!(
                    "the queries running now use all the memory queries may use together; retry shortly: {}",
                    strip(e)
                ))
            } else {
                Error::MemoryLimit(format!(
                    "the query needs more than the {} MiB of memory {} may use: {}",
                    pool.limit().unwrap_or(0) / (1024 * 1024),
                    access.who,
                    strip(e)
                ))
            }
        };
        let mut stream = frame.execute_stream().await.map_err(executed)?;
        let mut batches = Vec::new();
        let mut rows = 0usize;
        // The answer is held in memory too: it is reserved in the same pool.
        let answer = MemoryConsumer::new("the answer").register(&(pool.clone() as _));
        while let Some(batch) = futures::StreamExt::next(&mut stream).await {
            let batch = batch.map_err(executed)?;
            rows += batch.num_rows();
            if let Err(e) = answer.try_grow(batch.get_array_memory_size()) {
                return Err(match executed(e) {
                    Error::MemoryLimit(_) => Error::MemoryLimit(format!(
                        "the answer takes more than the {} MiB of memory {} may use: add a LIMIT, select fewer columns, or aggregate",
                        pool.limit().unwrap_or(0) / (1024 * 1024),
                        access.who
                    )),
                    other => other,
                });
            }
            if let Some(max) = access.max_rows
                && rows > max
            {
                return Err(Error::RowLimit(format!(
                    "the answer holds more than {max} rows, the most {} may fetch at once: add a LIMIT, aggregate, or page with OFFSET",
                    access.who
                )));
            }
            batches.push(batch);
        }
        Ok(QueryResult {
            schema,
            batches,
            _held: Some(Arc::new(answer)),
        })
    }

    /// Registers every table of the lake (and every live table) that `access` may read, for a
    /// statement that lists tables: one the caller may not read is left out, not refused.
    async fn register_readable(&self, ctx: &SessionContext, access: &Access) -> Result<()> {
        let mut ids = self.lake.all_tables().await?;
        ids.extend(self.live.iter().flat_map(|l| l.ids()));
        for id in ids {
            let reference = TableReference::partial(id.zone.as_str(), id.name.as_str());
            match self.register(ctx, &reference, access).await {
                Ok(()) | Err(Error::Forbidden(_)) => {}
                // A live table still being restored is listed once it is ready.
                Err(Error::NotReady(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Registers `<zone>.<table>` if such a Delta table exists; anything else is left for the
    /// planner to report as unknown.
    /// A name in a zone the caller may not read is refused whether or not the table exists.
    async fn register(
        &self,
        ctx: &SessionContext,
        reference: &TableReference,
        access: &Access,
    ) -> Result<()> {
        let (Some(zone), table) = (reference.schema(), reference.table()) else {
            return Ok(());
        };
        let Ok(id) = TableId::parse(&format!("{zone}.{table}")) else {
            return Ok(());
        };
        access.check_table(&id)?;
        // The same table named twice (usable.x and datafusion.usable.x) is registered once.
        if ctx
            .table_exist(TableReference::partial(zone, table))
            .unwrap_or(false)
        {
            return Ok(());
        }
        if let Some(provider) = self.live.as_ref().and_then(|l| l.provider(&id)) {
            ctx.register_table(
                TableReference::partial(zone, table),
                access.scope(&id, provider?)?,
            )
            .map_err(|e| Error::Internal(e.to_string()))?;
            return Ok(());
        }
        let Some(delta) = self.lake.load(&id).await? else {
            return Ok(());
        };
        delta
            .update_datafusion_session(&ctx.state())
            .map_err(|e| Error::Execution(DataFusionError::External(Box::new(e))))?;
        let provider = delta.table_provider().await.map_err(Error::Execution)?;
        ctx.register_table(
            TableReference::partial(zone, table),
            access.scope(&id, provider)?,
        )
        .map_err(|e| Error::Internal(e.to_string()))?;
        Ok(())
    }
}

/// The lake tables (`zone.table`) a statement names, without planning it; an error if it does
/// not parse. Names that are no zone table (CTEs, `information_schema`) are left out.
pub fn tables_named(sql: &str) -> Result<Vec<TableId>> {
    check_size(sql)?;
    let state = SessionContext::new().state();
    let statement = state
        .sql_to_statement(sql, &datafusion::config::Dialect::Generic)
        .map_err(|e| Error::Parse(strip(e)))?;
    Ok(state
        .resolve_table_references(&statement)
        .map_err(|e| Error::Plan(strip(e)))?
        .iter()
        .filter_map(|r| {
            let zone = r.schema()?;
            TableId::parse(&format!("{zone}.{}", r.table())).ok()
        })
        .collect())
}

/// Whether the statement is `EXPLAIN` of a query (not `DESCRIBE table`, which shows a schema).
fn is_explain(statement: &Statement) -> bool {
    use datafusion::sql::sqlparser::ast::Statement as Sql;
    match statement {
        Statement::Explain(_) => true,
        Statement::Statement(s) => matches!(s.as_ref(), Sql::Explain { .. }),
        _ => false,
    }
}

/// Refuses statements that write before they reach the planner (which would otherwise complain
/// about a missing table first).
fn refuse_writes(statement: &Statement) -> Result<()> {
    use datafusion::sql::sqlparser::ast::Statement as Sql;
    let kind = match statement {
        Statement::Statement(s) => match s.as_ref() {
            Sql::Query(_) | Sql::Explain { .. } | Sql::ExplainTable { .. } => return Ok(()),
            Sql::ShowTables { .. } | Sql::ShowColumns { .. } | Sql::ShowVariable { .. } => {
                return Ok(());
            }
            other => other
                .to_string()
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_uppercase(),
        },
        Statement::Explain(_) => return Ok(()),
        Statement::CopyTo(_) => "COPY".to_string(),
        Statement::CreateExternalTable(_) => "CREATE EXTERNAL TABLE".to_string(),
        other => format!("{other}")
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_uppercase(),
    };
    Err(Error::ReadOnly(format!("{kind} is not allowed")))
}

/// DataFusion prefixes messages with their category ("Error during planning: …"); keep the
/// message, since the error code already says which category it is.
fn strip(e: DataFusionError) -> String {
    e.strip_backtrace()
        .trim_start_matches("Error during planning: ")
        .trim_start_matches("SQL error: ")
        .to_string()
}

/// The most tokens one statement may hold.
pub const MAX_QUERY_TOKENS: usize = 100_000;
/// The most operators (`AND`, `OR`, `NOT`, comparisons, arithmetic, bitwise, casts, `LIKE`,
/// `IS`, `CASE … WHEN`) one statement may hold. The
/// planner and optimizer walk expression trees recursively, and `a = 1 OR a = 2 OR …` is a tree
/// as deep as it is long: a few thousand levels overflow a thread's stack and abort the process.
/// Long lists of values belong in `IN (…)`, which is flat.
pub const MAX_QUERY_OPERATORS: usize = 500;

/// The deepest nesting of parentheses (subqueries, expressions) one statement may hold.
pub const MAX_QUERY_NESTING: usize = 40;

/// Refuses, before parsing, a statement too large or too deep to plan safely: more than
/// [`MAX_QUERY_TOKENS`] tokens, [`MAX_QUERY_OPERATORS`] binary operators or
/// [`MAX_QUERY_NESTING`] levels of parentheses. The error is the user's (HTTP 400,
/// `query_too_large`).
pub fn check_size(sql: &str) -> Result<()> {
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::keywords::Keyword;
    use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize()
        .map_err(|e| Error::Parse(e.to_string()))?;
    if tokens.len() > MAX_QUERY_TOKENS {
        return Err(Error::TooLarge(format!(
            "the statement holds {} tokens, at most {MAX_QUERY_TOKENS} are allowed",
            tokens.len()
        )));
    }
    let mut depth = 0usize;
    let mut deepest = 0usize;
    for t in &tokens {
        match t {
            Token::LParen => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            Token::RParen => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    if deepest > MAX_QUERY_NESTING {
        return Err(Error::TooLarge(format!(
            "parentheses are nested {deepest} levels deep, at most {MAX_QUERY_NESTING} are allowed"
        )));
    }
    // Everything that joins or wraps an expression counts: binary and unary operators, casts,
    // `LIKE`/`IS`/`BETWEEN`, `CASE … WHEN`; names, literals, commas and parentheses do not.
    let operators = tokens
        .iter()
        .filter(|t| match t {
            Token::Word(w) => matches!(
                w.keyword,
                Keyword::AND
                    | Keyword::OR
                    | Keyword::XOR
                    | Keyword::NOT
                    | Keyword::LIKE
                    | Keyword::ILIKE
                    | Keyword::SIMILAR
                    | Keyword::REGEXP
                    | Keyword::RLIKE
                    | Keyword::IS
                    | Keyword::BETWEEN
                    | Keyword::CASE
                    | Keyword::WHEN
                    | Keyword::COLLATE
                    | Keyword::AT
            ),
            Token::Number(..)
            | Token::Comma
            | Token::Whitespace(_)
            | Token::LParen
            | Token::RParen
            | Token::Period
            | Token::SemiColon
            | Token::EOF
            | Token::Placeholder(_)
            | Token::SingleQuotedString(_)
            | Token::DoubleQuotedString(_)
            | Token::TripleSingleQuotedString(_)
            | Token::TripleDoubleQuotedString(_)
            | Token::DollarQuotedString(_)
            | Token::SingleQuotedByteStringLiteral(_)
            | Token::DoubleQuotedByteStringLiteral(_)
            | Token::TripleSingleQuotedByteStringLiteral(_)
            | Token::TripleDoubleQuotedByteStringLiteral(_)
            | Token::SingleQuotedRawStringLiteral(_)
            | Token::DoubleQuotedRawStringLiteral(_)
            | Token::TripleSingleQuotedRawStringLiteral(_)
            | Token::TripleDoubleQuotedRawStringLiteral(_)
            | Token::NationalStringLiteral(_)
            | Token::EscapedStringLiteral(_)
            | Token::UnicodeStringLiteral(_)
            | Token::HexStringLiteral(_) => false,
            _ => true,
        })
        .count();
    if operators > MAX_QUERY_OPERATORS {
        return Err(Error::TooLarge(format!(
            "the statement holds {operators} operators (AND, OR, NOT, comparisons, arithmetic, casts, LIKE, IS, CASE), at most {MAX_QUERY_OPERATORS} are allowed: \
             a long chain such as a = 1 OR a = 2 OR … is too deep to plan; write a IN (1, 2, …) instead"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetlake_zones::LakeConfig;
    use fleetlake_zones::schema::{RAW_TELEMETRY, RawMessage, raw_batch};

    async fn lake_with_rows(dir: &std::path::Path) -> Lake {
        let lake = Lake::open(&LakeConfig {
            location: dir.display().to_string(),
            ..Default::default()
        })
        .unwrap();
        let mut w = lake
            .writer(
                TableId::raw_telemetry(),
                RAW_TELEMETRY.clone(),
                vec!["ingest_date".into()],
                "t",
            )
            .await
            .unwrap();
        let messages: Vec<RawMessage> = (1..=3)
            .map(|i| RawMessage {
                payload: b"{}".to_vec(),
                subject: format!("telemetry.d{i}"),
                stream_seq: i,
                msg_id: None,
                received_at_us: 1_763_900_000_000_000,
            })
            .collect();
        w.commit(&raw_batch(&messages), "stream_seq", 3)
            .await
            .unwrap();
        lake
    }

    #[tokio::test]
    async fn reads_zone_tables_and_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let engine = QueryEngine::new(lake_with_rows(dir.path()).await);
        let r = engine
            .query("SELECT count(*) AS n, max(stream_seq) AS m FROM raw.telemetry")
            .await
            .unwrap();
        assert_eq!(r.row_count(), 1);
        let text = arrow::util::pretty::pretty_format_batches(&r.batches)
            .unwrap()
            .to_string();
        assert!(text.contains("| 3 | 3 |"), "{text}");

        // The anomaly functions are in the session (crate::session).
        let r = engine
            .query(
                "SELECT stream_seq, percentile_rank(CAST(stream_seq AS DOUBLE)) OVER () AS p, \
                 mad(CAST(stream_seq AS DOUBLE)) OVER () AS m FROM raw.telemetry ORDER BY stream_seq",
            )
            .await
            .unwrap();
        let text = arrow::util::pretty::pretty_format_batches(&r.batches)
            .unwrap()
            .to_string();
        assert!(
            text.contains("| 2          | 0.5                 | 1.0 |"),
            "{text}"
        );

        for (sql, code) in [
            ("SELEC 1", "sql_syntax"),
            ("SELECT nope FROM raw.telemetry", "sql_plan"),
            ("SELECT * FROM usable.nothing_here", "sql_plan"),
            ("DELETE FROM raw.telemetry", "read_only"),
            (
                "INSERT INTO raw.telemetry SELECT * FROM raw.telemetry",
                "read_only",
            ),
            ("DROP TABLE raw.telemetry", "read_only"),
            ("CREATE TABLE x AS SELECT 1", "read_only"),
            ("COPY (SELECT 1) TO '/tmp/fleetlake-copy.csv'", "read_only"),
            (
                "CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '/etc/passwd'",
                "read_only",
            ),
            ("SET datafusion.execution.batch_size = 1", "read_only"),
        ] {
            let err = engine.query(sql).await.unwrap_err();
            assert_eq!(err.code(), code, "{sql}: {err}");
            assert_eq!(err.kind(), crate::ErrorKind::User, "{sql}: {err}");
        }
        assert!(!std::path::Path::new("/tmp/fleetlake-copy.csv").exists());
    }

    #[test]
    fn statements_too_deep_or_too_large_to_plan_are_refused_before_parsing() {
        let ids: Vec<String> = (0..2000).map(|i| format!("'x{i}'")).collect();
        let in_list = format!("SELECT 1 WHERE d IN ({})", ids.join(", "));
        assert!(check_size(&in_list).is_ok());
        let chain: Vec<String> = ids.iter().map(|i| format!("d = {i}")).collect();
        let or_chain = format!("SELECT 1 WHERE {}", chain.join(" OR "));
        let err = check_size(&or_chain).unwrap_err();
        assert_eq!(err.code(), "query_too_large");
        assert!(err.to_string().contains("IN ("), "{err}");
        let nested = format!("SELECT {}1{}", "(".repeat(41), ")".repeat(41));
        assert!(
            check_size(&nested)
                .unwrap_err()
                .to_string()
                .contains("nested 41 levels")
        );
        assert!(check_size(&format!("SELECT {}1{}", "(".repeat(40), ")".repeat(40))).is_ok());
        for op in [
            "&1",
            "|1",
            "^1",
            "<<1",
            "::INT",
            " LIKE 'a'",
            " IS NULL",
            " || 'a'",
        ] {
            let chain = format!("SELECT 1{}", op.repeat(600));
            assert!(check_size(&chain).is_err(), "{op}");
        }
        let nots = format!("SELECT {}true", "NOT ".repeat(600));
        assert!(check_size(&nots).is_err());
    }
}
