//! Resident memory of this process, for the memory benchmarks (`dedup_memory`, `device_state`).

/// Resident set size in bytes, from /proc/self/statm (Linux).
pub(crate) fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("resident pages");
    pages * 4096
}
