use super::*;

#[test]
fn shares_add_up_to_every_partition() {
    for partitions in [0u32, 1, 5, 6, 7, 64] {
        for members in 1..=5 {
            let total: usize = (0..members).map(|r| share(partitions, members, r)).sum();
            assert_eq!(total, partitions as usize, "{partitions} over {members}");
            let most = (0..members).map(|r| share(partitions, members, r)).max();
            let least = (0..members).map(|r| share(partitions, members, r)).min();
            assert!(most.unwrap() - least.unwrap() <= 1);
        }
    }
}

#[test]
fn the_published_subject_is_the_stored_one_without_its_partition() {
    let p = Partition { index: 3, count: 6 };
    assert_eq!(p.filter_subject(), "fleetlake.3.>");
    assert_eq!(
        p.published("fleetlake.3.telemetry.coldchain.d1"),
        "telemetry.coldchain.d1"
    );
    assert_eq!(p.published("telemetry.d1"), "telemetry.d1");
    assert_eq!(
        p.published("fleetlake.x.telemetry"),
        "fleetlake.x.telemetry"
    );
    let t = subject_transform(6).unwrap();
    assert_eq!(
        (t.source.as_str(), t.destination.as_str()),
        (">", "fleetlake.{{partition(6)}}.>")
    );
    assert!(subject_transform(0).is_none());
}
