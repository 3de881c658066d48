//! Parsing pipeline files with DataFusion's SQL parser (sqlparser), extended by hand for the few
//! statements DataFusion does not have.

use arrow::datatypes::{DataType, TimeUnit};
use datafusion::sql::sqlparser::ast::{ColumnOption, DataType as SqlType};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::parser::{Parser, ParserError};
use datafusion::sql::sqlparser::tokenizer::{Location, Token};
use fleetlake_zones::{TableId, Zone};

use datafusion::sql::sqlparser::ast::Query;

use super::{
    Action, Column, DedupSpec, Expectation, PipelineError, PipelineFile, Pos, ReferenceDef,
    RuleDef, SourceDef, TableDef, WindowDef, WindowKind,
};

/// Options `CREATE SOURCE … WITH (…)` accepts.
pub const SOURCE_OPTIONS: &[&str] = &[
    "subject",
    "format",
    "dedup_key",
    "dedup_window",
    "event_time",
];

fn pos(l: Location) -> Pos {
    Pos {
        line: l.line,
        column: l.column,
    }
}

/// sqlparser's messages end in "at Line: L, Column: C"; turn that into our position.
fn from_parser(e: ParserError, fallback: Pos) -> PipelineError {
    let text = match e {
        ParserError::TokenizerError(s) | ParserError::ParserError(s) => s,
        ParserError::RecursionLimitExceeded => "the statement is nested too deeply".into(),
    };
    if let Some(at) = text.rfind(" at Line: ") {
        let tail = &text[at + " at Line: ".len()..];
        let mut parts = tail.split(", Column: ");
        let line = parts.next().and_then(|l| l.trim().parse().ok());
        let column = parts.next().and_then(|c| c.trim().parse().ok());
        if let (Some(line), Some(column)) = (line, column) {
            return PipelineError::new(Pos { line, column }, text[..at].to_string());
        }
    }
    PipelineError::new(fallback, text)
}

struct P<'a> {
    parser: Parser<'a>,
}

type R<T> = Result<T, PipelineError>;

impl P<'_> {
    fn here(&self) -> Pos {
        pos(self.parser.peek_token().span.start)
    }

    /// Runs one of sqlparser's own parse functions, positioning its errors.
    fn run<T>(&mut self, f: impl FnOnce(&mut Parser<'_>) -> Result<T, ParserError>) -> R<T> {
        let at = self.here();
        f(&mut self.parser).map_err(|e| from_parser(e, at))
    }

    /// A word that sqlparser may or may not treat as a keyword (SOURCE, STREAMING, EXPECT, …).
    fn word(&mut self, w: &str) -> bool {
        match &self.parser.peek_token().token {
            Token::Word(word)
                if word.quote_style.is_none() && word.value.eq_ignore_ascii_case(w) =>
            {
                self.parser.next_token();
                true
            }
            _ => false,
        }
    }

    fn expect_word(&mut self, w: &str, expected: &str) -> R<()> {
        if self.word(w) {
            Ok(())
        } else {
            Err(self.unexpected(expected))
        }
    }

    fn unexpected(&self, expected: &str) -> PipelineError {
        let token = self.parser.peek_token();
        let found = match &token.token {
            Token::EOF => "the end of the file".to_string(),
            Token::Word(w) => w.value.clone(),
            t => t.to_string(),
        };
        PipelineError::new(
            pos(token.span.start),
            format!("expected {expected}, found {found}"),
        )
    }

    fn expect(&mut self, t: Token, expected: &str) -> R<()> {
        if self.parser.consume_token(&t) {
            Ok(())
        } else {
            Err(self.unexpected(expected))
        }
    }

    fn statement(&mut self, file: &mut PipelineFile) -> R<()> {
        if !self.parser.parse_keyword(Keyword::CREATE) {
            return Err(self.unexpected(
                "CREATE SOURCE, STREAMING TABLE, REFERENCE TABLE, WINDOW TABLE or RULE",
            ));
        }
        if self.word("SOURCE") {
            let source = self.source()?;
            file.sources.push(source);
        } else if self.word("STREAMING") {
            self.expect_word("TABLE", "TABLE after CREATE STREAMING")?;
            let table = self.table()?;
            file.tables.push(table);
        } else if self.word("REFERENCE") {
            self.expect_word("TABLE", "TABLE after CREATE REFERENCE")?;
            let reference = self.reference()?;
            file.references.push(reference);
        } else if self.word("WINDOW") {
            self.expect_word("TABLE", "TABLE after CREATE WINDOW")?;
            let window = self.window()?;
            file.windows.push(window);
        } else if self.word("RULE") {
            let rule = self.rule()?;
            file.rules.push(rule);
        } else {
            return Err(self.unexpected(
                "SOURCE, STREAMING TABLE, REFERENCE TABLE, WINDOW TABLE or RULE after CREATE",
            ));
        }
        Ok(())
    }

    fn table_id(&mut self, zone: Zone, what: &str) -> R<(TableId, Pos)> {
        let at = self.here();
        let name = self.run(|p| p.parse_object_name(false))?.to_string();
        let qualified = if name.contains('.') {
            name.clone()
        } else {
            format!("{}.{name}", zone.as_str())
        };
        match TableId::parse(&qualified) {
            Ok(id) if id.zone == zone => Ok((id, at)),
            _ => Err(PipelineError::new(
                at,
                format!(
                    "{what} {name:?} must be a table of the {} zone, e.g. {}.readings",
                    zone.as_str(),
                    zone.as_str()
                ),
            )),
        }
    }

    fn columns(&mut self) -> R<Vec<Column>> {
        self.expect(Token::LParen, "( and the column list")?;
        self.list("a column", |this, columns: &[Column]| {
            let def = this.run(|p| p.parse_column_def())?;
            let at = pos(def.name.span.start);
            let name = def.name.value.clone();
            if columns.iter().any(|c| c.name.eq_ignore_ascii_case(&name)) {
                return Err(PipelineError::new(
                    at,
                    format!("column {name} is declared twice"),
                ));
            }
            let data_type = arrow_type(&def.data_type).ok_or_else(|| {
                PipelineError::new(
                    pos(def.data_type_span_start().unwrap_or(def.name.span.end)),
                    format!(
                        "unsupported type {} for column {name}: expected VARCHAR, BIGINT, INT, DOUBLE, BOOLEAN, TIMESTAMP or DATE",
                        def.data_type
                    ),
                )
            })?;
            let nullable = !def
                .options
                .iter()
                .any(|o| matches!(o.option, ColumnOption::NotNull));
            Ok(Column {
                name,
                data_type,
                nullable,
                pos: at,
            })
        })
    }

    fn source(&mut self) -> R<SourceDef> {
        let at = self.here();
        let name = self.run(|p| p.parse_identifier())?.value;
        let columns = self.columns()?;
        if !self.parser.parse_keyword(Keyword::WITH) {
            return Err(self.unexpected("WITH (subject = '…', …) after the columns of a source"));
        }
        let options = self.options()?;
        let mut source = SourceDef {
            name,
            pos: at,
            columns,
            subject: String::new(),
            format: "json".into(),
            dedup: DedupSpec::Columns(vec!["device_id".into(), "seq".into()]),
            dedup_window_minutes: 60,
            event_time: None,
            option_pos: options
                .iter()
                .map(|o| (o.key.clone(), o.value_at))
                .collect(),
        };
        for o in options {
            let (key, value, value_at) = (o.key.as_str(), o.value.clone(), o.value_at);
            let bad = |expected: &str| o.bad(expected);
            match key {
                "subject" => {
                    if value.is_empty() || value.contains(' ') {
                        return Err(bad("a NATS subject such as 'telemetry.coldchain.>'"));
                    }
                    source.subject = value;
                }
                "format" => {
                    if value != "json" {
                        return Err(bad("'json'"));
                    }
                    source.format = value;
                }
                "dedup_key" => {
                    source.dedup = match value.trim() {
                        "msg_id" => DedupSpec::MsgId,
                        "none" => DedupSpec::None,
                        cols => {
                            let cols: Vec<String> =
                                cols.split(',').map(|c| c.trim().to_string()).collect();
                            if cols.iter().any(|c| c.is_empty()) {
                                return Err(bad(
                                    "columns such as 'device_id, seq', or 'msg_id', or 'none'",
                                ));
                            }
                            DedupSpec::Columns(cols)
                        }
                    }
                }
                "dedup_window" => {
                    source.dedup_window_minutes = parse_minutes(&value)
                        .ok_or_else(|| bad("a duration such as '30m', '2h' or '1d'"))?;
                }
                "event_time" => source.event_time = Some((value, value_at)),
                _ => return Err(o.unknown("CREATE SOURCE", SOURCE_OPTIONS)),
            }
        }
        if source.subject.is_empty() {
            return Err(PipelineError::new(
                at,
                format!(
                    "source {} has no subject: add WITH (subject = 'telemetry.….>')",
                    source.name
                ),
            ));
        }
        Ok(source)
    }

    fn table(&mut self) -> R<TableDef> {
        let (table, at) = self.table_id(Zone::Usable, "a streaming table")?;
        let mut expectations = Vec::new();
        if self.parser.consume_token(&Token::LParen) {
            expectations = self.list("an expectation", |this, _| this.expectation())?;
        }
        let mut partitioned_by = Vec::new();
        if self.word("PARTITIONED") {
            self.expect_word("BY", "BY after PARTITIONED")?;
            self.expect(Token::LParen, "( and the partition columns")?;
            partitioned_by = self.list("a partition column", |this, _| {
                let c = this.run(|p| p.parse_identifier())?;
                Ok((c.value, pos(c.span.start)))
            })?;
        }
        if !self.parser.parse_keyword(Keyword::AS) {
            return Err(self.unexpected("AS SELECT … (the query that fills the table)"));
        }
        let query = self.run(|p| p.parse_query())?;
        Ok(TableDef {
            table,
            pos: at,
            expectations,
            partitioned_by,
            query,
        })
    }

    /// `( key = 'value', … )` after WITH; each key once.
    fn options(&mut self) -> R<Vec<Opt>> {
        self.expect(Token::LParen, "( after WITH")?;
        self.list("an option", |this, options: &[Opt]| {
            let key_at = this.here();
            let key = this.run(|p| p.parse_identifier())?.value.to_lowercase();
            this.expect(Token::Eq, "= after an option name")?;
            let value_at = this.here();
            let value = match this.parser.next_token().token {
                Token::SingleQuotedString(s) => s,
                Token::Number(n, _) => n,
                _ => {
                    return Err(PipelineError::new(
                        value_at,
                        format!(
                            "the value of option {key} must be a quoted string, e.g. {key} = '…'"
                        ),
                    ));
                }
            };
            if options.iter().any(|o| o.key == key) {
                return Err(PipelineError::new(
                    key_at,
                    format!("option {key} is given twice"),
                ));
            }
            Ok(Opt {
                key,
                key_at,
                value,
                value_at,
            })
        })
    }

    /// `WITH (…) AS SELECT …` of window tables and rules.
    fn options_and_query(&mut self, what: &str) -> R<(Vec<Opt>, Box<Query>)> {
        if !self.parser.parse_keyword(Keyword::WITH) {
            return Err(self.unexpected(&format!("WITH (…) after the name of {what}")));
        }
        let options = self.options()?;
        if !self.parser.parse_keyword(Keyword::AS) {
            return Err(self.unexpected(&format!("AS SELECT … (the query of {what})")));
        }
        let query = self.run(|p| p.parse_query())?;
        Ok((options, query))
    }

    fn window(&mut self) -> R<WindowDef> {
        let (table, at) = self.table_id(Zone::Final, "a window table")?;
        let (options, query) = self.options_and_query("a window table")?;
        let mut kind = None;
        let (mut size, mut slide, mut gap) = (None, None, None);
        let mut def = WindowDef {
            table,
            pos: at,
            kind: WindowKind::Tumbling { size: 0 },
            watermark: 0,
            allowed_lateness: 0,
            event_time: "ts".into(),
            option_pos: options
                .iter()
                .map(|o| (o.key.clone(), o.value_at))
                .collect(),
            query,
        };
        for o in &options {
            let duration = || {
                parse_duration(&o.value)
                    .ok_or_else(|| o.bad("a duration such as '30s', '5m', '1h' or '1d'"))
            };
            match o.key.as_str() {
                "window" => {
                    kind = Some(match o.value.trim().to_lowercase().as_str() {
                        k @ ("tumbling" | "hopping" | "session") => k.to_string(),
                        _ => return Err(o.bad("'tumbling', 'hopping' or 'session'")),
                    })
                }
                "size" => size = Some((duration()?, o)),
                "slide" => slide = Some((duration()?, o)),
                "gap" => gap = Some((duration()?, o)),
                "watermark" => def.watermark = duration_or_zero(o)?,
                "allowed_lateness" => def.allowed_lateness = duration_or_zero(o)?,
                "event_time" => def.event_time = o.value.trim().to_string(),
                _ => return Err(o.unknown("CREATE WINDOW TABLE", WINDOW_OPTIONS)),
            }
        }
        let misplaced = |opt: Option<(i64, &Opt)>, kind: &str| match opt {
            Some((_, o)) => Err(PipelineError::new(
                o.key_at,
                format!("option {} does not apply to {kind} windows", o.key),
            )),
            None => Ok(()),
        };
        let missing = |what: &str| PipelineError::new(at, format!("{}: {what}", def.table));
        def.kind = match kind.as_deref() {
            None => {
                return Err(missing(
                    "say which window: WITH (window = 'tumbling' | 'hopping' | 'session', …)",
                ));
            }
            Some("tumbling") => {
                misplaced(slide, "tumbling")?;
                misplaced(gap, "tumbling")?;
                let size = size
                    .ok_or_else(|| missing("a tumbling window needs size = '…'"))?
                    .0;
                WindowKind::Tumbling { size }
            }
            Some("hopping") => {
                misplaced(gap, "hopping")?;
                let size = size
                    .ok_or_else(|| missing("a hopping window needs size = '…'"))?
                    .0;
                let (slide, o) =
                    slide.ok_or_else(|| missing("a hopping window needs slide = '…'"))?;
                if slide > size || size % slide != 0 {
                    return Err(
                        o.bad("a slide that divides the size, e.g. size = '10m', slide = '5m'")
                    );
                }
                WindowKind::Hopping { size, slide }
            }
            _ => {
                misplaced(size, "session")?;
                misplaced(slide, "session")?;
                let gap = gap
                    .ok_or_else(|| missing("a session window needs gap = '…'"))?
                    .0;
                WindowKind::Session { gap }
            }
        };
        Ok(def)
    }

    fn rule(&mut self) -> R<RuleDef> {
        let at = self.here();
        let name = self.run(|p| p.parse_identifier())?.value;
        let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(PipelineError::new(
                at,
                format!(
                    "rule name {name:?}: expected letters, digits and _ (it becomes part of a NATS subject)"
                ),
            ));
        }
        let (options, query) = self.options_and_query("a rule")?;
        let mut rule = RuleDef {
            name,
            pos: at,
            severity: "warning".into(),
            key: Vec::new(),
            for_duration: 0,
            cool_down: 0,
            event_time: "ts".into(),
            group_by: Vec::new(),
            group_min: super::DEFAULT_GROUP_MIN,
            group_wait: super::DEFAULT_GROUP_WAIT_US,
            option_pos: options
                .iter()
                .map(|o| (o.key.clone(), o.value_at))
                .collect(),
            query,
        };
        for o in &options {
            match o.key.as_str() {
                "severity" => {
                    let s = o.value.trim().to_lowercase();
                    if !["info", "warning", "critical"].contains(&s.as_str()) {
                        return Err(o.bad("'info', 'warning' or 'critical'"));
                    }
                    rule.severity = s;
                }
                "key" => {
                    rule.key = o.value.split(',').map(|c| c.trim().to_string()).collect();
                    if rule.key.iter().any(|c| c.is_empty()) {
                        return Err(o.bad("columns such as 'device_id' or 'tenant, site'"));
                    }
                }
                "for" => rule.for_duration = duration_or_zero(o)?,
                "cool_down" => rule.cool_down = duration_or_zero(o)?,
                "event_time" => rule.event_time = o.value.trim().to_string(),
                "group_by" => {
                    rule.group_by = o.value.split(',').map(|c| c.trim().to_string()).collect();
                    if rule.group_by.iter().any(|c| c.is_empty()) {
                        return Err(o.bad("columns such as 'site' or 'tenant, site'"));
                    }
                }
                "group_min" => {
                    rule.group_min = o
                        .value
                        .trim()
                        .parse()
                        .ok()
                        .filter(|n| *n >= 2)
                        .ok_or_else(|| o.bad("a whole number of keys, at least 2"))?;
                }
                "group_wait" => rule.group_wait = duration_or_zero(o)?,
                _ => return Err(o.unknown("CREATE RULE", RULE_OPTIONS)),
            }
        }
        if rule.key.is_empty() {
            return Err(PipelineError::new(
                at,
                format!(
                    "rule {}: say what an alert is about: WITH (key = 'device_id', …)",
                    rule.name
                ),
            ));
        }
        if rule.group_by.is_empty()
            && let Some(o) = options
                .iter()
                .find(|o| o.key == "group_min" || o.key == "group_wait")
        {
            return Err(PipelineError::new(
                o.value_at,
                format!(
                    "rule {}: {} applies to cohort grouping; say which columns name a cohort: group_by = 'site'",
                    rule.name, o.key
                ),
            ));
        }
        Ok(rule)
    }

    /// `CONSTRAINT name EXPECT (condition) [ON VIOLATION action]`.
    fn expectation(&mut self) -> R<Expectation> {
        let e_at = self.here();
        if !self.parser.parse_keyword(Keyword::CONSTRAINT) {
            return Err(self.unexpected("CONSTRAINT name EXPECT (condition)"));
        }
        let name = self.run(|p| p.parse_identifier())?.value;
        self.expect_word("EXPECT", "EXPECT (condition) after the constraint name")?;
        self.expect(Token::LParen, "( around the condition")?;
        let condition = self.run(|p| p.parse_expr())?;
        self.expect(Token::RParen, ") after the condition")?;
        let action = if self.parser.parse_keyword(Keyword::ON) {
            self.expect_word("VIOLATION", "VIOLATION after ON")?;
            self.action()?
        } else {
            Action::Warn
        };
        Ok(Expectation {
            name,
            condition,
            action,
            pos: e_at,
        })
    }

    /// Items separated by commas up to the closing `)` (the `(` is already consumed); `item`
    /// sees the items parsed so far.
    fn list<T>(&mut self, what: &str, mut item: impl FnMut(&mut Self, &[T]) -> R<T>) -> R<Vec<T>> {
        let mut items = Vec::new();
        loop {
            let next = item(self, &items)?;
            items.push(next);
            if self.parser.consume_token(&Token::Comma) {
                continue;
            }
            self.expect(Token::RParen, &format!(", or ) after {what}"))?;
            return Ok(items);
        }
    }

    fn action(&mut self) -> R<Action> {
        if self.word("WARN") {
            Ok(Action::Warn)
        } else if self.parser.parse_keyword(Keyword::DROP) {
            self.word("ROW");
            Ok(Action::Drop)
        } else if self.word("QUARANTINE") {
            Ok(Action::Quarantine)
        } else if self.word("FAIL") {
            let _ = self.parser.parse_keyword(Keyword::UPDATE);
            Ok(Action::Fail)
        } else {
            Err(self.unexpected("WARN, DROP, QUARANTINE or FAIL after ON VIOLATION"))
        }
    }

    fn reference(&mut self) -> R<ReferenceDef> {
        let (table, at) = self.table_id(Zone::Reference, "a reference table")?;
        let columns = self.columns()?;
        Ok(ReferenceDef {
            table,
            pos: at,
            columns,
        })
    }
}

/// Where a column's type starts, when the parser recorded it (types carry no span).
trait TypeSpan {
    fn data_type_span_start(&self) -> Option<Location>;
}

impl TypeSpan for datafusion::sql::sqlparser::ast::ColumnDef {
    fn data_type_span_start(&self) -> Option<Location> {
        let end = self.name.span.end;
        (end.line > 0).then(|| Location {
            line: end.line,
            column: end.column + 1,
        })
    }
}

/// One `key = 'value'` of a WITH list.
struct Opt {
    key: String,
    key_at: Pos,
    value: String,
    value_at: Pos,
}

impl Opt {
    fn bad(&self, expected: &str) -> PipelineError {
        PipelineError::new(
            self.value_at,
            format!(
                "option {} = {:?}: expected {expected}",
                self.key, self.value
            ),
        )
    }
    fn unknown(&self, statement: &str, known: &[&str]) -> PipelineError {
        PipelineError::new(
            self.key_at,
            format!(
                "unknown option {} for {statement}: expected one of {}",
                self.key,
                known.join(", ")
            ),
        )
    }
}

/// Options `CREATE WINDOW TABLE … WITH (…)` accepts.
pub const WINDOW_OPTIONS: &[&str] = &[
    "window",
    "size",
    "slide",
    "gap",
    "watermark",
    "allowed_lateness",
    "event_time",
];

/// Options `CREATE RULE … WITH (…)` accepts.
pub const RULE_OPTIONS: &[&str] = &[
    "severity",
    "key",
    "for",
    "cool_down",
    "event_time",
    "group_by",
    "group_min",
    "group_wait",
];

/// A positive duration in microseconds: `500ms`, `30s`, `5m`, `2h`, `1d`, also `5 minutes`.
pub fn parse_duration(s: &str) -> Option<i64> {
    duration_us(s).filter(|d| *d > 0)
}

/// [`parse_duration`], zero allowed (`0s`, `0m`).
fn duration_us(s: &str) -> Option<i64> {
    let s = s.trim();
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = number.parse().ok()?;
    let unit = match unit.trim().to_lowercase().as_str() {
        "ms" | "millisecond" | "milliseconds" => 1_000,
        "s" | "sec" | "second" | "seconds" => 1_000_000,
        "m" | "min" | "minute" | "minutes" => 60_000_000,
        "h" | "hour" | "hours" => 3_600_000_000,
        "d" | "day" | "days" => 86_400_000_000,
        _ => return None,
    };
    n.checked_mul(unit)
}

/// A duration that may be zero (`'0'`, `'0s'`, …: watermark, lateness, for, cool-down).
fn duration_or_zero(o: &Opt) -> R<i64> {
    if o.value.trim() == "0" {
        return Ok(0);
    }
    duration_us(&o.value).ok_or_else(|| o.bad("a duration such as '0', '30s', '5m' or '1h'"))
}

/// `30m`, `2h`, `1d`, `90s` (rounded up to whole minutes).
fn parse_minutes(s: &str) -> Option<i64> {
    let s = s.trim();
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: i64 = number.parse().ok()?;
    let minutes = match unit.trim() {
        "s" => (n + 59) / 60,
        "m" | "min" => n,
        "h" => n * 60,
        "d" => n * 24 * 60,
        _ => return None,
    };
    (minutes > 0).then_some(minutes)
}

fn arrow_type(t: &SqlType) -> Option<DataType> {
    Some(match t {
        SqlType::Varchar(_) | SqlType::Text | SqlType::String(_) | SqlType::CharVarying(_) => {
            DataType::Utf8
        }
        SqlType::BigInt(_) | SqlType::Int8(_) | SqlType::Int64 => DataType::Int64,
        SqlType::Int(_) | SqlType::Integer(_) | SqlType::Int4(_) | SqlType::Int32 => {
            DataType::Int32
        }
        SqlType::Double(_) | SqlType::DoublePrecision | SqlType::Float8 | SqlType::Float64 => {
            DataType::Float64
        }
        SqlType::Float(_) | SqlType::Real | SqlType::Float4 | SqlType::Float32 => DataType::Float32,
        SqlType::Boolean | SqlType::Bool => DataType::Boolean,
        SqlType::Timestamp(_, _) => DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
        SqlType::Date => DataType::Date32,
        _ => return None,
    })
}

/// Parses one pipeline file.
pub fn parse_file(text: &str) -> Result<PipelineFile, PipelineError> {
    let dialect = GenericDialect {};
    let start = Pos { line: 1, column: 1 };
    let parser = Parser::new(&dialect)
        .try_with_sql(text)
        .map_err(|e| from_parser(e, start))?;
    let mut p = P { parser };
    let mut file = PipelineFile::default();
    loop {
        while p.parser.consume_token(&Token::SemiColon) {}
        if p.parser.peek_token().token == Token::EOF {
            break;
        }
        p.statement(&mut file)?;
        if !p.parser.consume_token(&Token::SemiColon) && p.parser.peek_token().token != Token::EOF {
            return Err(p.unexpected("; at the end of the statement"));
        }
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_minutes("30m"), Some(30));
        assert_eq!(parse_minutes("2h"), Some(120));
        assert_eq!(parse_minutes("1d"), Some(1440));
        assert_eq!(parse_minutes("90s"), Some(2));
        assert_eq!(parse_minutes("soon"), None);
        assert_eq!(parse_minutes("0m"), None);
        assert_eq!(parse_duration("90s"), Some(90_000_000));
        assert_eq!(parse_duration("5 minutes"), Some(300_000_000));
        assert_eq!(parse_duration("250ms"), Some(250_000));
        assert_eq!(parse_duration("0s"), None);
        assert_eq!(duration_us("0s"), Some(0));
        assert_eq!(duration_us("0 minutes"), Some(0));
        assert_eq!(parse_duration("5 fortnights"), None);
    }
}
