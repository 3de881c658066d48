//! What Linux says about processes, for the benchmarks: this process's resident memory
//! (`dedup_memory`, `device_state`) and a process's CPU time (`suite`, `cluster`).

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

/// CPU time (user + system) process `pid` has used so far, seconds, from `/proc/<pid>/stat`
/// (Linux; 100 clock ticks a second).
#[allow(dead_code)] // not every benchmark that includes this file measures CPU
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name in parentheses: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}
