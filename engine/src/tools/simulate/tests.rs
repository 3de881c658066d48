use super::*;

fn config() -> SimConfig {
    SimConfig {
        seed: 7,
        devices: 50,
        messages: 20_000,
        duplicates: 0.05,
        malformed: 0.01,
        late: 0.1,
        start_ms: Some(1_763_900_000_000),
        ..Default::default()
    }
}

#[test]
fn same_seed_same_messages_and_exact_shares() {
    let a: Vec<_> = Simulator::new(config()).collect();
    let b: Vec<_> = Simulator::new(config()).collect();
    assert_eq!(a.len(), 20_000);
    assert!(
        a.iter()
            .zip(&b)
            .all(|(x, y)| x.payload == y.payload && x.subject == y.subject)
    );
    let count = |k| a.iter().filter(|m| m.kind == k).count();
    assert_eq!(count(Kind::Malformed), 200);
    assert_eq!(count(Kind::Duplicate), 1000);
    assert_eq!(count(Kind::Good), 18_800);
    let other: Vec<_> = Simulator::new(SimConfig {
        seed: 8,
        ..config()
    })
    .take(10)
    .collect();
    assert!(other.iter().zip(&a).any(|(x, y)| x.payload != y.payload));
}

#[test]
fn every_good_reading_is_a_distinct_device_and_sequence() {
    let mut seen = std::collections::HashSet::new();
    for m in Simulator::new(config()).filter(|m| m.kind == Kind::Good) {
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert!(seen.insert((
            v["device_id"].as_str().unwrap().to_string(),
            v["seq"].as_u64().unwrap()
        )));
    }
    assert_eq!(seen.len(), 18_800);
}

#[test]
fn mixed_fleets_send_every_profile_on_its_subject() {
    let messages: Vec<_> = Simulator::new(SimConfig {
        profile: Profile::Mixed,
        ..config()
    })
    .filter(|m| m.kind == Kind::Good)
    .take(3000)
    .collect();
    for (prefix, field) in [
        ("telemetry.coldchain.", "door_open"),
        ("telemetry.health.", "uptime_s"),
    ] {
        let of_kind: Vec<_> = messages
            .iter()
            .filter(|m| m.subject.starts_with(prefix))
            .collect();
        assert!(of_kind.len() > 500, "{prefix}: {}", of_kind.len());
        for m in of_kind {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            assert!(v.get(field).is_some(), "{v}");
        }
    }
    let cold: Vec<serde_json::Value> = messages
        .iter()
        .filter(|m| m.subject.starts_with("telemetry.coldchain."))
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect();
    assert!(
        cold.iter().any(|v| v.get("temp_f").is_some())
            && cold.iter().any(|v| v.get("temp_c").is_some())
    );
}

#[test]
fn shares_are_checked() {
    let err = SimConfig {
        malformed: 1.5,
        ..config()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(err.contains("--malformed"), "{err}");
}

#[test]
fn faults_parse_and_say_what_is_wrong() {
    assert_eq!(Faults::parse("demo").unwrap(), Faults::demo());
    assert_eq!(Faults::parse("none").unwrap(), Faults::default());
    let f = Faults::parse("drift=5, crash=1.9.0/rev-C, noisy=RT-100, beta=2").unwrap();
    assert_eq!(f.drift, 5);
    assert_eq!(f.crash, Some(("1.9.0".into(), "rev-C".into())));
    assert_eq!(f.noisy_model.as_deref(), Some("RT-100"));
    assert_eq!(f.beta, 2);
    for (spec, says) in [
        ("drift", "not key=value"),
        ("drift=many", "expected a number"),
        ("crash=2.0.1", "FIRMWARE/HW_REV"),
        ("melt=1", "unknown fault"),
    ] {
        let err = Faults::parse(spec).unwrap_err().to_string();
        assert!(err.contains(says), "{spec}: {err}");
    }
}

#[test]
fn planted_faults_are_where_the_report_says() {
    let sim = SimConfig {
        profile: Profile::Mixed,
        devices: 900,
        messages: 60_000,
        faults: Faults::demo(),
        start_ms: Some(1_763_900_000_000),
        ..config()
    };
    let planted = Simulator::new(sim.clone()).planted().unwrap();
    assert_eq!(planted.drifting.len(), 20);
    assert_eq!(planted.beta_devices.len(), 3);
    let registry = Simulator::new(sim.clone()).registry_csv();
    assert!(registry.starts_with("device_id,tenant,site,model,hw_rev\n"));
    assert_eq!(registry.lines().count(), 901);
    let model: std::collections::HashMap<&str, &str> = registry
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0], f[3])
        })
        .collect();
    // Drifting devices are outside the noisy model; every model and revision is used.
    assert!(
        planted
            .drifting
            .iter()
            .all(|d| model[d.as_str()] != "RT-300")
    );
    for value in ["RT-100", "RT-300", "rev-A", "rev-C"] {
        assert!(registry.contains(value), "{value}");
    }

    let (mut crashes, mut reports) = (
        std::collections::HashMap::new(),
        std::collections::HashMap::new(),
    );
    let mut hottest_drifting = f64::MIN;
    for m in Simulator::new(sim).filter(|m| m.kind == Kind::Good) {
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        let id = v["device_id"].as_str().unwrap().to_string();
        if m.subject.starts_with("telemetry.health.") {
            let cohort = format!(
                "{}/{}",
                v["fw"].as_str().unwrap(),
                v["hw"].as_str().unwrap()
            );
            *reports.entry(cohort.clone()).or_insert(0u64) += 1;
            *crashes.entry(cohort).or_insert(0u64) += v.get("crash_report").is_some() as u64;
        }
        if planted.drifting.contains(&id)
            && let Some(t) = v
                .get("temp_c")
                .or(v.get("temperature"))
                .and_then(|t| t.as_f64())
        {
            hottest_drifting = hottest_drifting.max(t);
        }
        if planted.beta_devices.contains(&id) {
            assert_eq!(v["fw"], BETA_FIRMWARE);
        }
    }
    let rate = |c: &str| crashes[c] as f64 / reports[c] as f64;
    assert!(rate("2.0.1/rev-B") > 0.025, "{}", rate("2.0.1/rev-B"));
    assert!(rate("2.0.1/rev-A") < 0.015, "{}", rate("2.0.1/rev-A"));
    assert!(hottest_drifting > 20.0, "{hottest_drifting}");
}
