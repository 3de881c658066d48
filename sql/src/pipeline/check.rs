//! `fleetlake check`: parse and plan every pipeline without running it.
//!
//! Each table's query is planned by DataFusion against the source's declared columns and the
//! declared reference tables; each expectation is planned against the table's output and must be
//! a boolean condition. Errors carry the file position DataFusion's diagnostics point at.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::DFSchema;
use datafusion::error::DataFusionError;
use datafusion::sql::parser::Statement;
use datafusion::sql::sqlparser::ast::{Spanned, Statement as SqlStatement};
use fleetlake_zones::{TableId, Zone};

use super::run::{aggregates, declared_references, session, with_lineage};
use super::{
    DedupSpec, PipelineError, PipelineFile, Pos, ReferenceDef, RuleDef, SourceDef, TableDef,
    WindowDef, parse_file,
};

/// A pipeline that checks: its parts and the schema of each table it fills.
#[derive(Debug, Clone)]
pub struct CheckedPipeline {
    /// The file's name without `.sql`.
    pub name: String,
    pub source: SourceDef,
    /// Each table with the schema its query returns (including `stream_seq`).
    pub tables: Vec<(TableDef, SchemaRef)>,
    /// The reference tables declared alongside (in any checked file).
    pub references: Vec<ReferenceDef>,
}

/// A window table that checks: what it reads and how its rows are stored.
#[derive(Debug, Clone)]
pub struct CheckedWindow {
    pub def: WindowDef,
    pub input: TableId,
    pub input_schema: SchemaRef,
    /// The table's storage schema (the query's columns and `stream_seq`).
    pub schema: SchemaRef,
}

/// A rule that checks, and the table it reads.
#[derive(Debug, Clone)]
pub struct CheckedRule {
    pub def: RuleDef,
    pub input: TableId,
    pub input_schema: SchemaRef,
    /// A condition or a silence rule.
    pub kind: crate::rules::RuleKind,
}

/// What checking one file found.
#[derive(Debug, Clone)]
pub struct FileReport {
    pub path: PathBuf,
    /// The pipeline, when the file declares one and it checks.
    pub pipeline: Option<CheckedPipeline>,
    pub windows: Vec<CheckedWindow>,
    pub rules: Vec<CheckedRule>,
    /// Reference tables the file declares.
    pub references: Vec<TableId>,
    pub errors: Vec<PipelineError>,
    /// What checks but may not do what the author expects (e.g. a window function in a query
    /// that runs per micro-batch).
    pub warnings: Vec<PipelineError>,
}

impl FileReport {
    /// `path:line:column: message` per warning.
    pub fn warning_lines(&self) -> Vec<String> {
        self.warnings
            .iter()
            .map(|e| format!("{}:{e}", self.path.display()))
            .collect()
    }

    /// `path:line:column: message` per error.
    pub fn error_lines(&self) -> Vec<String> {
        self.errors
            .iter()
            .map(|e| format!("{}:{e}", self.path.display()))
            .collect()
    }
}

/// The window functions (`… OVER (…)`) in queries that run per micro-batch — a pipeline's
/// tables and rules — as warnings: such a function sees only the rows of one micro-batch, so
/// its value depends on how the stream was cut (see the README, "Anomaly functions").
pub fn per_batch_window_functions(file: &PipelineFile) -> Vec<PipelineError> {
    use datafusion::sql::sqlparser::ast::{Expr, visit_expressions};
    fn window_functions(query: &datafusion::sql::sqlparser::ast::Query) -> Vec<String> {
        let mut found = Vec::new();
        let _ = visit_expressions(query, |e: &Expr| {
            if let Expr::Function(f) = e
                && f.over.is_some()
            {
                let name = f.name.to_string();
                if !found.contains(&name) {
                    found.push(name);
                }
            }
            std::ops::ControlFlow::<()>::Continue(())
        });
        found
    }
    let what = |kind: &str, name: &str, functions: Vec<String>| {
        format!(
            "{kind} {name} uses the window function{} {}: in a {kind} it sees the rows of one \
             micro-batch only, so its value depends on how the stream is cut; compute it in an \
             ad-hoc query or a fleet endpoint over the table instead",
            if functions.len() > 1 { "s" } else { "" },
            functions.join(", ")
        )
    };
    let mut out = Vec::new();
    for t in &file.tables {
        let functions = window_functions(&t.query);
        if !functions.is_empty() {
            out.push(PipelineError::new(
                t.pos,
                what("pipeline table", &t.table.to_string(), functions),
            ));
        }
    }
    for r in &file.rules {
        let functions = window_functions(&r.query);
        if !functions.is_empty() {
            out.push(PipelineError::new(r.pos, what("rule", &r.name, functions)));
        }
    }
    out
}

/// The `.sql` files under `paths` (folders are searched recursively), sorted.
pub fn pipeline_files(paths: &[PathBuf]) -> std::io::Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                walk(&path, out)?;
            } else if path.extension().is_some_and(|e| e == "sql") {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            walk(p, &mut out)?;
        } else {
            std::fs::metadata(p)?;
            out.push(p.clone());
        }
    }
    out.sort();
    Ok(out)
}

/// Parses and checks the given pipeline files together (reference tables declared in any file are
/// visible to all).
pub async fn check_files(files: &[PathBuf]) -> Vec<FileReport> {
    let texts = files
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).map_err(|e| format!("reading the file: {e}"));
            (path.clone(), text)
        })
        .collect();
    check_texts(texts).await
}

/// [`check_files`] over texts: each path with its text, or why it could not be read (e.g. to
/// check a changed file before it is written).
pub async fn check_texts(files: Vec<(PathBuf, Result<String, String>)>) -> Vec<FileReport> {
    let mut parsed: Vec<(PathBuf, Result<PipelineFile, PipelineError>)> = Vec::new();
    for (path, text) in files {
        let result = match text {
            Ok(text) => parse_file(&text),
            Err(e) => Err(PipelineError::new(Pos::default(), e)),
        };
        parsed.push((path, result));
    }
    let mut references: BTreeMap<TableId, ReferenceDef> = BTreeMap::new();
    let mut reports = Vec::new();
    let mut duplicate_refs = Vec::new();
    for (path, file) in &parsed {
        if let Ok(file) = file {
            for r in &file.references {
                if references.insert(r.table.clone(), r.clone()).is_some() {
                    duplicate_refs.push((path.clone(), r.clone()));
                }
            }
        }
    }
    let mut owners: BTreeMap<TableId, PathBuf> = BTreeMap::new();
    let mut derived = Vec::new();
    for (path, file) in parsed {
        let mut report = FileReport {
            path: path.clone(),
            pipeline: None,
            windows: Vec::new(),
            rules: Vec::new(),
            references: Vec::new(),
            errors: Vec::new(),
            warnings: Vec::new(),
        };
        match file {
            Err(e) => report.errors.push(e),
            Ok(file) => {
                report.references = file.references.iter().map(|r| r.table.clone()).collect();
                report.warnings = per_batch_window_functions(&file);
                for (p, r) in &duplicate_refs {
                    if *p == path {
                        report.errors.push(PipelineError::new(
                            r.pos,
                            format!(
                                "reference table {} is declared in more than one file",
                                r.table
                            ),
                        ));
                    }
                }
                for t in &file.tables {
                    if let Some(other) = owners.insert(t.table.clone(), path.clone()) {
                        report.errors.push(PipelineError::new(
                            t.pos,
                            format!("{} is already filled by {}", t.table, other.display()),
                        ));
                    }
                }
                derived.push((reports.len(), file.windows.clone(), file.rules.clone()));
                let name = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                match check_pipeline(&name, file, &references).await {
                    Ok(p) => report.pipeline = p,
                    Err(mut errors) => report.errors.append(&mut errors),
                }
            }
        }
        reports.push(report);
    }
    check_derived(&mut reports, derived, &references).await;
    reports
}

/// Checks the window tables and rules of every file, once all pipelines are known: windows read
/// the usable tables of pipelines, rules read those or window tables declared before them.
async fn check_derived(
    reports: &mut [FileReport],
    derived: Vec<(usize, Vec<WindowDef>, Vec<RuleDef>)>,
    references: &BTreeMap<TableId, ReferenceDef>,
) {
    let declared: Vec<ReferenceDef> = references.values().cloned().collect();
    let refs = declared_references(&declared);
    // The built-in decoder's table (the default envelope), then the pipelines' tables.
    let mut tables: BTreeMap<TableId, SchemaRef> = fleetlake_zones::schema::builtin_tables()
        .into_iter()
        .filter(|(id, _, _)| *id == TableId::usable_telemetry())
        .map(|(id, schema, _)| (id, schema))
        .collect();
    for r in reports.iter() {
        for (def, planned) in r.pipeline.iter().flat_map(|p| &p.tables) {
            tables.insert(def.table.clone(), super::run::storage_schema(planned));
        }
    }
    // "<what> reads FROM a … table (the tables there are), not <what it read>".
    let wrong_input =
        |pos: Pos, what: String, other: Option<TableId>, tables: &BTreeMap<TableId, SchemaRef>| {
            let known: Vec<String> = tables.keys().map(|t| t.to_string()).collect();
            let other = other.map(|t| t.to_string());
            PipelineError::new(
                pos,
                format!(
                    "{what} ({}), not {}",
                    known.join(", "),
                    other.as_deref().unwrap_or("this")
                ),
            )
        };
    for (at, windows, _) in &derived {
        for w in windows {
            let input = match crate::window::input_table(&w.query) {
                Some(t) if t.zone == Zone::Usable && tables.contains_key(&t) => t,
                other => {
                    let what = format!("{}: a window table reads FROM a usable table", w.table);
                    reports[*at]
                        .errors
                        .push(wrong_input(w.pos, what, other, &tables));
                    continue;
                }
            };
            let input_schema = tables[&input].clone();
            match crate::window::plan_window(w, &input, &input_schema, &refs).await {
                Ok(planned) => {
                    let schema = planned.schema;
                    if input_schema.field_with_name(&w.event_time).is_err() {
                        reports[*at].errors.push(PipelineError::new(
                            w.pos,
                            format!(
                                "{}: the event time column {} is not a column of {input} (set event_time = '…')",
                                w.table, w.event_time
                            ),
                        ));
                        continue;
                    }
                    if tables.insert(w.table.clone(), schema.clone()).is_some() {
                        reports[*at].errors.push(PipelineError::new(
                            w.pos,
                            format!("{} is declared twice", w.table),
                        ));
                        continue;
                    }
                    reports[*at].windows.push(CheckedWindow {
                        def: w.clone(),
                        input,
                        input_schema,
                        schema,
                    });
                }
                Err(e) => reports[*at].errors.push(PipelineError::new(
                    w.pos,
                    format!("in the query of {}: {e}", w.table),
                )),
            }
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for (at, _, rules) in &derived {
        for r in rules {
            if !names.insert(r.name.clone()) {
                reports[*at].errors.push(PipelineError::new(
                    r.pos,
                    format!("rule {} is declared twice", r.name),
                ));
                continue;
            }
            let input = match crate::window::input_table(&r.query) {
                Some(t) if tables.contains_key(&t) => t,
                other => {
                    let what = format!(
                        "rule {}: a rule reads FROM a usable or window table",
                        r.name
                    );
                    reports[*at]
                        .errors
                        .push(wrong_input(r.pos, what, other, &tables));
                    continue;
                }
            };
            let input_schema = tables[&input].clone();
            match crate::rules::check_rule(r, &input, &input_schema, &refs).await {
                Ok(kind) => reports[*at].rules.push(CheckedRule {
                    kind,
                    def: r.clone(),
                    input,
                    input_schema,
                }),
                Err(e) => reports[*at].errors.push(PipelineError::new(
                    r.pos,
                    format!("in rule {}: {e}", r.name),
                )),
            }
        }
    }
}

/// Checks one parsed file; `Ok(None)` for a file that only declares reference tables.
async fn check_pipeline(
    name: &str,
    file: PipelineFile,
    references: &BTreeMap<TableId, ReferenceDef>,
) -> Result<Option<CheckedPipeline>, Vec<PipelineError>> {
    let mut errors = Vec::new();
    let source = match (file.sources.len(), file.tables.first()) {
        (0, None) => return Ok(None),
        (0, Some(first)) => {
            return Err(vec![PipelineError::new(
                first.pos,
                "missing source: a pipeline declares CREATE SOURCE name (columns) WITH (subject = '…') before its tables",
            )]);
        }
        (1, None) => {
            return Err(vec![PipelineError::new(
                file.sources[0].pos,
                format!(
                    "source {} fills nothing: add CREATE STREAMING TABLE usable.… AS SELECT … FROM {}",
                    file.sources[0].name, file.sources[0].name
                ),
            )]);
        }
        (1, Some(_)) => file.sources[0].clone(),
        (_, _) => {
            return Err(vec![PipelineError::new(
                file.sources[1].pos,
                "a pipeline file declares one source: put the second pipeline in a file of its own",
            )]);
        }
    };
    check_source(&source, &mut errors);
    let mut tables = Vec::new();
    for table in file.tables {
        match check_table(&source, &table, references).await {
            Ok(schema) => tables.push((table, schema)),
            Err(mut e) => errors.append(&mut e),
        }
    }
    if errors.is_empty() {
        Ok(Some(CheckedPipeline {
            name: name.to_string(),
            source,
            tables,
            references: references.values().cloned().collect(),
        }))
    } else {
        Err(errors)
    }
}

fn check_source(source: &SourceDef, errors: &mut Vec<PipelineError>) {
    let column = |name: &str| {
        source
            .columns
            .iter()
            .find(|c| c.name.eq_ignore_ascii_case(name))
    };
    let known = || {
        source
            .columns
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some((event_time, at)) = &source.event_time {
        match column(event_time) {
            None => errors.push(PipelineError::new(
                *at,
                format!(
                    "event_time names unknown column {event_time}; the source has {}",
                    known()
                ),
            )),
            Some(c) if !matches!(c.data_type, DataType::Timestamp(..)) => {
                errors.push(PipelineError::new(
                    *at,
                    format!(
                        "event_time column {event_time} is {}, expected TIMESTAMP",
                        c.data_type
                    ),
                ))
            }
            Some(_) => {}
        }
    }
    if let DedupSpec::Columns(cols) = &source.dedup {
        let at = source
            .option_pos
            .iter()
            .find(|(k, _)| k == "dedup_key")
            .map(|(_, p)| *p)
            .unwrap_or(source.pos);
        let written = source.option_pos.iter().any(|(k, _)| k == "dedup_key");
        if cols.len() != 2 {
            errors.push(PipelineError::new(
                at,
                format!(
                    "dedup_key names {} columns: expected two, the device and its integer sequence number (e.g. 'device_id, seq'), or 'msg_id', or 'none'",
                    cols.len()
                ),
            ));
        } else if let Some(c) = column(&cols[1])
            && !c.data_type.is_integer()
        {
            errors.push(PipelineError::new(
                at,
                format!(
                    "dedup_key's second column {} is {}, expected an integer sequence number",
                    c.name, c.data_type
                ),
            ));
        }
        for c in cols {
            if column(c).is_none() {
                let message = if written {
                    format!(
                        "dedup_key names unknown column {c}; the source has {}",
                        known()
                    )
                } else {
                    format!(
                        "the default dedup_key 'device_id, seq' needs column {c}: declare it, or set dedup_key to other columns, 'msg_id' or 'none'"
                    )
                };
                errors.push(PipelineError::new(at, message));
            }
        }
    }
}

/// The position a DataFusion error points at, if it carries a diagnostic with a span.
fn located(e: &DataFusionError, fallback: Pos) -> PipelineError {
    let pos = e
        .iter()
        .find_map(|e| e.diagnostic().and_then(|d| d.span))
        .filter(|s| s.start.line > 0)
        .map(|s| Pos {
            line: s.start.line,
            column: s.start.column,
        })
        .unwrap_or(fallback);
    let message = e
        .strip_backtrace()
        .trim_start_matches("Error during planning: ")
        .trim_start_matches("Schema error: ")
        .replace('\n', " ");
    PipelineError::new(pos, message)
}

async fn check_table(
    source: &SourceDef,
    table: &TableDef,
    references: &BTreeMap<TableId, ReferenceDef>,
) -> Result<SchemaRef, Vec<PipelineError>> {
    let query = with_lineage(table, &source.name).map_err(|e| vec![e])?;
    let (_, visible) = super::run::source_schemas(source);
    let declared: Vec<ReferenceDef> = references.values().cloned().collect();
    let ctx = session(
        source,
        RecordBatch::new_empty(visible),
        &declared_references(&declared),
        true,
    )
    .map_err(|e| vec![PipelineError::new(table.pos, e.to_string())])?;
    let state = ctx.state();
    let statement = Statement::Statement(Box::new(SqlStatement::Query(query)));
    let plan = state.statement_to_plan(statement).await.map_err(|e| {
        let mut err = located(&e, table.pos);
        err.message = format!("in the query of {}: {}", table.table, err.message);
        vec![err]
    })?;
    if aggregates(&plan) {
        return Err(vec![PipelineError::new(
            table.pos,
            format!(
                "{}: a streaming table keeps one row per reading, so its query cannot aggregate; aggregate in windows instead",
                table.table
            ),
        )]);
    }
    let df_schema: &DFSchema = plan.schema();
    let schema: SchemaRef = Arc::new(df_schema.as_arrow().clone());
    let mut errors = Vec::new();
    let outputs = || {
        schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (column, at) in &table.partitioned_by {
        if schema.field_with_name(column).is_err() {
            errors.push(PipelineError::new(
                *at,
                format!(
                    "partition column {column} is not an output of the query; it returns {}",
                    outputs()
                ),
            ));
        }
    }
    for e in &table.expectations {
        let at = {
            let span = e.condition.span();
            if span.start.line > 0 {
                Pos {
                    line: span.start.line,
                    column: span.start.column,
                }
            } else {
                e.pos
            }
        };
        let expr = state.create_logical_expr(&e.condition.to_string(), df_schema);
        if let Ok(expr) = &expr
            && let Some(problem) = text_compared_with_number(expr, df_schema)
        {
            errors.push(PipelineError::new(
                at,
                format!("in expectation {}: {problem}", e.name),
            ));
            continue;
        }
        let planned = expr
            .and_then(|expr| datafusion::logical_expr::ExprSchemable::get_type(&expr, df_schema));
        match planned {
            Ok(DataType::Boolean) => {}
            Ok(other) => errors.push(PipelineError::new(
                at,
                format!(
                    "expectation {} must be a boolean condition, but it is {other}",
                    e.name
                ),
            )),
            Err(err) => {
                let mut err = located(&err, at);
                err.pos = at;
                err.message = format!("in expectation {}: {}", e.name, err.message);
                errors.push(err);
            }
        }
    }
    if errors.is_empty() {
        Ok(schema)
    } else {
        Err(errors)
    }
}

/// A comparison of a text column with a number (`state > 5` on a `VARCHAR`): DataFusion would
/// coerce one side and compare as text (`'10' < '9'`) or fail on the first row that is not a
/// number. The explanation, if `expr` holds one.
fn text_compared_with_number(
    expr: &datafusion::logical_expr::Expr,
    schema: &datafusion::common::DFSchema,
) -> Option<String> {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    use datafusion::logical_expr::{BinaryExpr, Expr, ExprSchemable, Operator};
    let text =
        |t: &DataType| matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View);
    let mut found = None;
    let _ = expr.apply(|e| {
        if let Expr::BinaryExpr(BinaryExpr { left, op, right }) = e
            && matches!(
                op,
                Operator::Eq
                    | Operator::NotEq
                    | Operator::Lt
                    | Operator::LtEq
                    | Operator::Gt
                    | Operator::GtEq
            )
            && let (Ok(l), Ok(r)) = (left.get_type(schema), right.get_type(schema))
        {
            let (column, other) = if text(&l) && r.is_numeric() {
                (left, right)
            } else if text(&r) && l.is_numeric() {
                (right, left)
            } else {
                return Ok(TreeNodeRecursion::Continue);
            };
            found = Some(format!(
                "{column} is text (VARCHAR) and is compared with the number {other}: text compares as text ('10' < '9') and a value that is not a number fails the batch; compare with text ('{}') or cast it (CAST({column} AS DOUBLE))",
                other.to_string().trim_matches('\'')
            ));
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}
