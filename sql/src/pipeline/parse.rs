//! Parsing pipeline files with DataFusion's SQL parser (sqlparser), extended by hand for the few
//! statements DataFusion does not have.

use arrow::datatypes::{DataType, TimeUnit};
use datafusion::sql::sqlparser::ast::{ColumnOption, DataType as SqlType};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::parser::{Parser, ParserError};
use datafusion::sql::sqlparser::tokenizer::{Location, Token};
use fleetlake_zones::{TableId, Zone};

use super::{
    Action, Column, DedupSpec, Expectation, PipelineError, PipelineFile, Pos, ReferenceDef,
    SourceDef, TableDef,
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
            return Err(
                self.unexpected("CREATE SOURCE, CREATE STREAMING TABLE or CREATE REFERENCE TABLE")
            );
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
        } else {
            return Err(self.unexpected("SOURCE, STREAMING TABLE or REFERENCE TABLE after CREATE"));
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
        let mut columns: Vec<Column> = Vec::new();
        loop {
            let def = self.run(|p| p.parse_column_def())?;
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
            columns.push(Column {
                name,
                data_type,
                nullable,
                pos: at,
            });
            if self.parser.consume_token(&Token::Comma) {
                continue;
            }
            self.expect(Token::RParen, ", or ) after a column")?;
            return Ok(columns);
        }
    }

    fn source(&mut self) -> R<SourceDef> {
        let at = self.here();
        let name = self.run(|p| p.parse_identifier())?.value;
        let columns = self.columns()?;
        if !self.parser.parse_keyword(Keyword::WITH) {
            return Err(self.unexpected("WITH (subject = '…', …) after the columns of a source"));
        }
        self.expect(Token::LParen, "( after WITH")?;
        let mut source = SourceDef {
            name,
            pos: at,
            columns,
            subject: String::new(),
            format: "json".into(),
            dedup: DedupSpec::Columns(vec!["device_id".into(), "seq".into()]),
            dedup_window_minutes: 60,
            event_time: None,
            option_pos: Vec::new(),
        };
        loop {
            let key_at = self.here();
            let key = self.run(|p| p.parse_identifier())?.value.to_lowercase();
            self.expect(Token::Eq, "= after an option name")?;
            let value_at = self.here();
            let value = match self.parser.next_token().token {
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
            if source.option_pos.iter().any(|(k, _)| *k == key) {
                return Err(PipelineError::new(
                    key_at,
                    format!("option {key} is given twice"),
                ));
            }
            source.option_pos.push((key.clone(), value_at));
            let bad = |expected: &str| {
                PipelineError::new(
                    value_at,
                    format!("option {key} = {value:?}: expected {expected}"),
                )
            };
            match key.as_str() {
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
                _ => {
                    return Err(PipelineError::new(
                        key_at,
                        format!(
                            "unknown option {key} for CREATE SOURCE: expected one of {}",
                            SOURCE_OPTIONS.join(", ")
                        ),
                    ));
                }
            }
            if self.parser.consume_token(&Token::Comma) {
                continue;
            }
            self.expect(Token::RParen, ", or ) after an option")?;
            break;
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
            loop {
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
                expectations.push(Expectation {
                    name,
                    condition,
                    action,
                    pos: e_at,
                });
                if self.parser.consume_token(&Token::Comma) {
                    continue;
                }
                self.expect(Token::RParen, ", or ) after an expectation")?;
                break;
            }
        }
        let mut partitioned_by = Vec::new();
        if self.word("PARTITIONED") {
            self.expect_word("BY", "BY after PARTITIONED")?;
            self.expect(Token::LParen, "( and the partition columns")?;
            loop {
                let c = self.run(|p| p.parse_identifier())?;
                partitioned_by.push((c.value, pos(c.span.start)));
                if self.parser.consume_token(&Token::Comma) {
                    continue;
                }
                self.expect(Token::RParen, ", or ) after a partition column")?;
                break;
            }
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
    }
}
