//! Stable hashes: the same value in every process and build, because what they make outlives
//! the process (alert ids, rule and window versions, message ids in dedup snapshots, subject
//! suffixes). FNV-1a, 64 bit (Fowler, Noll, Vo: <http://www.isthe.com/chongo/tech/comp/fnv/>).
//! Not for untrusted keys in hash tables (no seed): use the standard `HashMap` there.

const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a of `bytes`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(OFFSET, |h, b| (h ^ *b as u64).wrapping_mul(PRIME))
}

/// FNV-1a of the parts, each followed by a 0 byte (so `["ab", "c"]` and `["a", "bc"]` differ).
pub fn stable_hash(parts: &[&str]) -> u64 {
    let mut h = OFFSET;
    for p in parts {
        for b in p.bytes().chain([0u8]) {
            h = (h ^ b as u64).wrapping_mul(PRIME);
        }
    }
    h
}

const OFFSET_32: u32 = 0x811c_9dc5;
const PRIME_32: u32 = 0x0100_0193;

/// The partition NATS assigns `subject` among `partitions` (0-based, `< partitions`): FNV-1a,
/// 32 bit, of the whole subject, modulo `partitions` — what the subject mapping
/// `{{partition(P)}}` computes (nats-server `server/subject_transform.go`, `getHashPartition`).
/// fleetlake maps its stream's subjects with it (`cluster.partitions`), so this must never
/// change. Panics when `partitions` is 0.
pub fn nats_partition(subject: &str, partitions: u32) -> u32 {
    let h = subject
        .bytes()
        .fold(OFFSET_32, |h, b| (h ^ b as u32).wrapping_mul(PRIME_32));
    h % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_never_change() {
        // Persisted: a change here breaks snapshots and alert ids already written.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(stable_hash(&["ab", "c"]), stable_hash(&["a", "bc"]));
    }

    #[test]
    fn partitions_are_the_ones_nats_server_assigns() {
        // Read back from nats-server 2.15 with the stream subject transform
        // `>` -> `fleetlake.{{partition(4)}}.>` (the integration test `cluster` checks the same
        // against a running server for every message it publishes).
        for (subject, p) in [
            ("telemetry.coldchain.d1", 2),
            ("telemetry.coldchain.d2", 3),
            ("telemetry.health.d1", 1),
            ("telemetry.d9", 1),
            ("telemetry.a.b.c", 2),
        ] {
            assert_eq!(nats_partition(subject, 4), p, "{subject}");
        }
    }
}
