//! The pipeline language takes untrusted text (rules arrive over HTTP): seeded random mutations
//! of the shipped files and of rules must parse or fail with a position inside the text — never
//! panic — and the checker must answer for each.

use std::path::PathBuf;

use fleetlake_sql::pipeline::{check_texts, parse_file, pipeline_files};

/// xorshift64*: deterministic, so a failure can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const PIECES: &[&str] = &[
    "(",
    ")",
    "'",
    "\"",
    ",",
    ";",
    "--",
    "/*",
    "*/",
    " ",
    "\n",
    "WITH",
    "AS",
    "SELECT",
    "FROM",
    "GROUP BY",
    "CREATE RULE",
    "CREATE WINDOW TABLE",
    "CREATE SOURCE",
    "=",
    "'5m'",
    "'0'",
    "'-1s'",
    "'9999999999999999999d'",
    "key",
    "for",
    "cool_down",
    "severity",
    "window",
    "size",
    "NULL",
    "é",
    "°",
    "🚚",
    "\u{0}",
    "\\",
    "firing",
    "resolved",
    "usable.x",
    "final.",
    "reference.",
    "1e309",
    "-",
    "JOIN",
    "ON",
    "window_start",
    "window_end",
    "count(*)",
    "CAST(",
    "::",
];

fn mutate(text: &str, rng: &mut Rng) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(chars.len() + 1);
        match rng.below(3) {
            0 => {
                let end = (at + rng.below(20)).min(chars.len());
                chars.drain(at..end);
            }
            1 => {
                let piece = PIECES[rng.below(PIECES.len())];
                chars.splice(at..at, piece.chars());
            }
            _ => {
                // Repeat a slice somewhere else.
                let from = rng.below(chars.len() + 1);
                let end = (from + rng.below(30)).min(chars.len());
                let copy: Vec<char> = chars[from..end].to_vec();
                let at = at.min(chars.len());
                chars.splice(at..at, copy);
            }
        }
    }
    chars.into_iter().collect()
}

fn shipped() -> Vec<(PathBuf, String)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pipelines");
    pipeline_files(&[root])
        .unwrap()
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect()
}

#[test]
fn mutated_files_parse_or_fail_at_a_position_inside_them() {
    let files = shipped();
    let mut rng = Rng(0x5eed_f1ee_71a4_e001);
    let (mut parsed, mut refused) = (0, 0);
    for round in 0..3_000 {
        let (path, text) = &files[round % files.len()];
        let seed = rng.0;
        let mutated = mutate(text, &mut rng);
        let result = std::panic::catch_unwind(|| parse_file(&mutated));
        let Ok(result) = result else {
            panic!(
                "parse_file panicked on a mutation of {} (seed {seed:#x}):\n{mutated}",
                path.display()
            );
        };
        parsed += usize::from(result.is_ok());
        if let Err(e) = result {
            refused += 1;
            let lines = mutated.lines().count() as u64 + 1;
            assert!(
                e.pos.line <= lines,
                "{}: error at {} beyond the text's {lines} lines (seed {seed:#x}): {e}",
                path.display(),
                e.pos
            );
            assert!(!e.message.is_empty());
        }
    }
    // The mutations reach both sides: texts that still parse and texts that do not.
    assert!(
        parsed > 300 && refused > 300,
        "{parsed} parsed, {refused} refused"
    );
}

#[tokio::test]
async fn the_checker_answers_for_mutated_rules() {
    let files = shipped();
    let mut rng = Rng(0x00c0_ffee_0000_0001);
    let rules: Vec<&(PathBuf, String)> = files
        .iter()
        .filter(|(p, _)| p.to_string_lossy().contains("/rules/"))
        .collect();
    assert!(!rules.is_empty());
    for round in 0..60 {
        let (path, text) = rules[round % rules.len()];
        let mutated = mutate(text, &mut rng);
        let texts: Vec<(PathBuf, Result<String, String>)> = files
            .iter()
            .map(|(p, t)| {
                let t = if p == path {
                    mutated.clone()
                } else {
                    t.clone()
                };
                (p.clone(), Ok(t))
            })
            .collect();
        let reports = check_texts(texts).await;
        let report = reports.iter().find(|r| r.path == *path).unwrap();
        // A text that does not parse is reported; one that parses and checks declares its
        // rules; every error says where, inside the text.
        match parse_file(&mutated) {
            Err(_) => assert!(!report.errors.is_empty(), "{}", path.display()),
            Ok(f) if report.errors.is_empty() => {
                assert_eq!(report.rules.len(), f.rules.len(), "{mutated}")
            }
            Ok(_) => {}
        }
        let lines = mutated.lines().count() as u64 + 1;
        for e in &report.errors {
            assert!(
                e.pos.line <= lines && !e.message.is_empty(),
                "{e}:\n{mutated}"
            );
        }
    }
}
