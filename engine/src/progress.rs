//! A progress bar on stderr for long commands (`replay`, `maintain`).

use std::io::Write as _;

/// A progress bar on stderr, redrawn in place.
pub fn bar(done: f64, what: &str) {
    let width = 30;
    let filled = ((done * width as f64).round() as usize).min(width);
    eprint!(
        "\r  [{}{}] {:>3.0}%  {what}",
        "#".repeat(filled),
        " ".repeat(width - filled),
        done * 100.0,
    );
    let _ = std::io::stderr().flush();
}
