//! Ingest and replication: registration, epochs, lag bookkeeping, operator settings.
use super::*;
use crate::error::CloudError;
use crate::ingest::{Enrollment, Frame, PassProgress};
use crate::replication::SettingsChange;
use crate::state::SystemState;
use ferry_common::error::{ErrorKind, Kind};
use ferry_common::token::Scope;

fn kind<T: std::fmt::Debug>(r: Result<T, CloudError>) -> Kind {
    r.unwrap_err().kind()
}

#[tokio::test]
async fn registration_records_the_system_and_readies_its_replica() {
    let h = harness();
    let ack = register(&h, "web01", "10.0.0.5/24").await;
    assert_eq!(ack.durable_epoch, 0);
    let status = h.cloud.replication.list("web01").unwrap();
    assert_eq!(status[0].record.state(), SystemState::Scanning);
    assert!(status[0].replicas[0].path.is_dir());
}

#[tokio::test]
async fn an_agent_writes_only_its_own_system_and_a_site_only_those_bound_to_it() {
    let h = harness();
    let reg = Registration {
        system: "web01".into(),
        fresh_state: false,
        probe: HostInfo::default(),
        filesystems: vec![root_fs()],
        ..Default::default()
    };
    let r = h.cloud.ingest.register(&agent("db01"), reg.clone()).await;
    assert_eq!(kind(r), Kind::PermissionDenied);
    let err = (h.cloud.ingest.register(&site(), reg.clone()).await).unwrap_err();
    assert_eq!(err.kind(), Kind::PermissionDenied);
    assert!(
        err.to_string().contains("ferry sites bind site1 web01"),
        "{err}"
    );
    assert!(h.cloud.replication.system("web01").unwrap().is_none());
    h.cloud
        .ingest
        .bind_site("site1", &["web01".to_string()])
        .unwrap();
    h.cloud.ingest.register(&site(), reg).await.unwrap();
    let r = h
        .cloud
        .ingest
        .apply_batch(&agent("db01"), batch("web01", 1, vec![]))
        .await;
    assert_eq!(kind(r), Kind::PermissionDenied);
    h.cloud
        .ingest
        .apply_batch(&site(), batch("web01", 1, vec![]))
        .await
        .unwrap();
    assert_eq!(
        h.cloud.replication.require("web01").unwrap().via,
        "site:site1"
    );
}

#[tokio::test]
async fn a_registration_with_no_or_too_many_file_systems_stores_nothing() {
    let h = harness();
    for n in [0, 65] {
        let reg = Registration {
            system: "web01".into(),
            fresh_state: false,
            probe: HostInfo::default(),
            filesystems: (0..n)
                .map(|i| FsRecord {
                    fs_id: format!("fs{i}"),
                    ..root_fs()
                })
                .collect(),
            ..Default::default()
        };
        let r = h.cloud.ingest.register(&agent("web01"), reg).await;
        assert_eq!(kind(r), Kind::InvalidArgument, "{n} file systems");
    }
    assert!(h.cloud.replication.all().unwrap().is_empty());
}

#[tokio::test]
async fn an_unsupported_file_system_type_is_refused_before_anything_is_stored() {
    let h = harness();
    let reg = Registration {
        system: "web01".into(),
        fresh_state: false,
        probe: HostInfo::default(),
        filesystems: vec![FsRecord {
            fstype: "zfs".into(),
            ..root_fs()
        }],
        ..Default::default()
    };
    let r = h.cloud.ingest.register(&agent("web01"), reg).await;
    assert_eq!(kind(r), Kind::InvalidArgument);
    assert!(h.cloud.replication.system("web01").unwrap().is_none());
}

#[tokio::test]
async fn the_probe_is_kept_typed_and_records_that_kept_it_as_text_still_load() {
    let h = harness();
    register(&h, "web01", "10.0.0.5/24").await;
    let rec = h.cloud.replication.require("web01").unwrap();
    assert_eq!(rec.probe.nics[0].addresses, ["10.0.0.5/24"]);
    let addr = crate::prepare::address_of(&rec).unwrap();
    assert_eq!((addr.ip.to_string(), addr.prefix), ("10.0.0.5".into(), 24));
    // A record written before the probe was typed held it as JSON text.
    let old = serde_json::json!({
        "name": "db01",
        "probe_json": serde_json::to_string(&probe("db01", "10.0.0.6/24")).unwrap(),
        "filesystems": [],
        "durable_epoch": 4,
        "last_durable_ms": 0,
        "via": "",
    });
    let rec: crate::state::SystemRecord = serde_json::from_value(old).unwrap();
    assert_eq!(
        (rec.probe.hostname.as_str(), rec.durable_epoch),
        ("db01", 4)
    );
}

#[tokio::test]
async fn a_re_registration_keeps_the_durable_epoch_and_updates_usage() {
    let h = harness();
    register(&h, "web01", "10.0.0.5/24").await;
    let ingest = &h.cloud.ingest;
    ingest
        .apply_batch(&agent("web01"), batch("web01", 1, vec![dir_entry("a")]))
        .await
        .unwrap();
    let reg = Registration {
        system: "web01".into(),
        fresh_state: false,
        probe: probe("web01", "10.0.0.5/24"),
        filesystems: vec![FsRecord {
            used_bytes: 5 << 20,
            ..root_fs()
        }],
        ..Default::default()
    };
    let ack = ingest.register(&agent("web01"), reg).await.unwrap();
    assert_eq!(ack.durable_epoch, 1);
    let rec = h.cloud.replication.require("web01").unwrap();
    assert_eq!(rec.filesystems.len(), 1);
    assert_eq!(rec.filesystems[0].used_bytes, 5 << 20);
}

#[tokio::test]
async fn a_batch_for_an_unknown_system_or_file_system_is_not_found() {
    let h = harness();
    let ingest = &h.cloud.ingest;
    let r = ingest
        .apply_batch(&agent("web01"), batch("web01", 1, vec![]))
        .await;
    assert_eq!(kind(r), Kind::NotFound);
    register(&h, "web01", "10.0.0.5/24").await;
    let mut b = batch("web01", 1, vec![]);
    b.fs_id = "var".into();
    assert_eq!(
        kind(ingest.apply_batch(&agent("web01"), b).await),
        Kind::NotFound
    );
    assert_eq!(
        h.cloud.replication.require("web01").unwrap().durable_epoch,
        0
    );
}

#[tokio::test]
async fn epochs_become_durable_in_order_and_write_the_replica() {
    let h = harness();
    register(&h, "web01", "10.0.0.5/24").await;
    for (epoch, dir) in [(1, "a"), (2, "a/b"), (3, "c")] {
        let ack = (h.cloud.ingest)
            .apply_batch(&agent("web01"), batch("web01", epoch, vec![dir_entry(dir)]))
            .await
            .unwrap();
        assert_eq!(ack.durable_epoch, epoch);
    }
    let replica = h.cloud.replication.replica_path("web01", "/").unwrap();
    assert!(replica.join("a/b").is_dir() && replica.join("c").is_dir());
    assert_eq!(h.cloud.counters.snapshot().batches_applied, 3);
}

#[tokio::test]
async fn a_replayed_epoch_is_acknowledged_without_being_applied_again() {
    let h = harness();
    register(&h, "web01", "10.0.0.5/24").await;
    let ingest = &h.cloud.ingest;
    let b = batch("web01", 1, vec![dir_entry("a")]);
    ingest
        .apply_batch(&agent("web01"), b.clone())
        .await
        .unwrap();
    let replica = h.cloud.replication.replica_path("web01", "/").unwrap();
    std::fs::remove_dir(replica.join("a")).unwrap();
    let ack = ingest.apply_batch(&agent("web01"), b).await.unwrap();
    assert_eq!(ack.durable_epoch, 1);
    assert!(!replica.join("a").exists(), "epoch 1 was applied twice");
    assert_eq!(h.cloud.counters.snapshot().batches_applied, 1);
}

/// A batch that assumes a replica other than the one there (a rename whose source the
/// replica lacks) is not applied on top of it: the agent is asked for a resync, the
/// batches built on its belief are dropped, and the resync pass repairs the replica.
#[tokio::test]
async fn a_replica_that_disagrees_asks_for_a_resync_and_drops_batches_until_it_comes() {
    let h = harness();
    register(&h, "web01", "10.0.0.5/24").await;
    let ingest = &h.cloud.ingest;
    ingest
        .apply_batch(&agent("web01"), batch("web01", 1, vec![dir_entry("a")]))
        .await
        .unwrap();
    let replica = h.cloud.replication.replica_path("web01", "/").unwrap();
    std::fs::remove_dir(replica.join("a")).unwrap();
    let rename = Entry {
        kind: EntryKind::Rename as i32,
        link_target: b"a".to_vec(),
        ..dir_entry("b")
    };
    let ack = ingest
        .apply_batch(&agent("web01"), batch("web01", 2, vec![rename]))
        .await
        .unwrap();
    assert_eq!(ack.durable_epoch, 1);
    assert_eq!(ack.settings.resync_from, 2);
    let rec = h.cloud.replication.require("web01").unwrap();
    assert_eq!((rec.resync_from, rec.resyncs), (2, 1));
    assert!(
        rec.last_error.contains("sending everything again"),
        "{}",
        rec.last_error
    );

    // A batch from before the agent heard of it is dropped, not applied.
    let ack = ingest
        .apply_batch(&agent("web01"), batch("web01", 3, vec![dir_entry("c")]))
        .await
        .unwrap();
    assert_eq!((ack.durable_epoch, ack.settings.resync_from), (1, 2));
    assert!(!replica.join("c").exists());

    // A resync answering another refusal is dropped too.
    let stale = Batch {
        resync_for: 1,
        ends_pass: true,
        ..batch("web01", 4, vec![dir_entry("c")])
    };
    let ack = ingest.apply_batch(&agent("web01"), stale).await.unwrap();
    assert_eq!((ack.durable_epoch, ack.settings.resync_from), (1, 2));
    // The resync pass is applied; the request ends with its last batch.
    let first = Batch {
        resync_for: 2,
        ..batch("web01", 5, vec![dir_entry("b")])
    };
    let ack = ingest.apply_batch(&agent("web01"), first).await.unwrap();
    assert_eq!((ack.durable_epoch, ack.settings.resync_from), (5, 2));
    let last = Batch {
        resync_for: 2,
        ends_pass: true,
        ..batch("web01", 6, vec![dir_entry("c")])
    };
    let ack = ingest.apply_batch(&agent("web01"), last).await.unwrap();
    assert_eq!((ack.durable_epoch, ack.settings.resync_from), (6, 0));
    assert!(replica.join("b").is_dir() && replica.join("c").is_dir());
    let rec = h.cloud.replication.require("web01").unwrap();
    assert_eq!((rec.resync_from, rec.last_error.as_str()), (0, ""));
}

/// A batch whose predecessor never arrived (lost or dead-lettered on the way) is not
/// applied: the agent is asked for a resync. So is an agent whose state is new while
/// the replica holds something.
#[tokio::test]
async fn an_epoch_gap_or_an_agent_with_new_state_asks_for_a_resync() {
    let h = harness();
    register(&h, "web01", "10.0.0.5/24").await;
    let ingest = &h.cloud.ingest;
    let after = |epoch, after_epoch, name| Batch {
        after_epoch,
        ..batch("web01", epoch, vec![dir_entry(name)])
    };
    let ack = ingest
        .apply_batch(&agent("web01"), after(1, 0, "a"))
        .await
        .unwrap();
    assert_eq!((ack.durable_epoch, ack.settings.resync_from), (1, 0));
    let ack = ingest
        .apply_batch(&agent("web01"), after(2, 1, "b"))
        .await
        .unwrap();
    assert_eq!((ack.durable_epoch, ack.settings.resync_from), (2, 0));
    // Epoch 3 never came; 4 builds on it.
    let ack = ingest
        .apply_batch(&agent("web01"), after(4, 3, "d"))
        .await
        .unwrap();
    assert_eq!((ack.durable_epoch, ack.settings.resync_from), (2, 4));
    let replica = h.cloud.replication.replica_path("web01", "/").unwrap();
    assert!(replica.join("b").is_dir() && !replica.join("d").exists());
    let rec = h.cloud.replication.require("web01").unwrap();
    assert!(
        rec.last_error.contains("never arrived"),
        "{}",
        rec.last_error
    );
    // The resync pass's first batch builds on nothing and goes in, whatever it says (an
    // agent from before resyncs said where it was); a gap inside the pass asks for
    // another.
    let resync = |epoch, after_epoch, ends_pass| Batch {
        resync_for: 4,
        ends_pass,
        ..after(epoch, after_epoch, "d")
    };
    let ack = ingest
        .apply_batch(&agent("web01"), resync(5, 4, false))
        .await
        .unwrap();
    assert_eq!((ack.durable_epoch, ack.settings.resync_from), (5, 4));
    let ack = ingest
        .apply_batch(&agent("web01"), resync(7, 6, true))
        .await
        .unwrap();
    assert_eq!((ack.durable_epoch, ack.settings.resync_from), (5, 7));
    let again = Batch {
        resync_for: 7,
        ends_pass: true,
        ..after(8, 0, "d")
    };
    let ack = ingest.apply_batch(&agent("web01"), again).await.unwrap();
    assert_eq!((ack.durable_epoch, ack.settings.resync_from), (8, 0));
    assert!(replica.join("d").is_dir());

    // An agent that lost its state registers: everything goes again.
    let fresh = Registration {
        system: "web01".into(),
        fresh_state: true,
        probe: HostInfo::default(),
        filesystems: vec![root_fs()],
        ..Default::default()
    };
    let ack = ingest
        .register(&agent("web01"), fresh.clone())
        .await
        .unwrap();
    assert_eq!(ack.settings.resync_from, 8);
    // A first run (nothing durable yet) is not asked for anything.
    register(&h, "db01", "10.0.0.6/24").await;
    let first = Registration {
        system: "db01".into(),
        ..fresh
    };
    let ack = ingest.register(&agent("db01"), first).await.unwrap();
    assert_eq!(ack.settings.resync_from, 0);
}

#[tokio::test]
async fn a_batch_over_the_entry_limit_is_refused() {
    let h = harness();
    register(&h, "web01", "10.0.0.5/24").await;
    let entries = vec![dir_entry("a"); crate::ingest::MAX_ENTRIES + 1];
    let r = (h.cloud.ingest)
        .apply_batch(&agent("web01"), batch("web01", 1, entries))
        .await;
    assert_eq!(kind(r), Kind::InvalidArgument);
}

#[tokio::test]
async fn a_bad_entry_is_kept_as_the_systems_error_until_a_batch_is_durable() {
    let h = harness();
    register(&h, "web01", "10.0.0.5/24").await;
    let ingest = &h.cloud.ingest;
    let bad = Entry {
        path: b"../escape".to_vec(),
        ..dir_entry("x")
    };
    assert!(ingest
        .apply_batch(&agent("web01"), batch("web01", 1, vec![bad]))
        .await
        .is_err());
    let rec = h.cloud.replication.require("web01").unwrap();
    assert!(rec.last_error.starts_with("epoch 1:"), "{}", rec.last_error);
    assert_eq!(rec.durable_epoch, 0);
    ingest
        .apply_batch(&agent("web01"), batch("web01", 1, vec![dir_entry("a")]))
        .await
        .unwrap();
    assert_eq!(h.cloud.replication.require("web01").unwrap().last_error, "");
}

#[tokio::test]
async fn a_durable_batch_records_its_change_to_durable_latency_and_pass_progress() {
    let h = harness();
    register(&h, "web01", "10.0.0.5/24").await;
    let mut b = batch("web01", 1, vec![]);
    b.source_time_ms = ferry_common::now_ms() - 5000;
    b.progress = Some(PassProgress {
        phase: "in-sync".into(),
        bytes_done: 10,
        bytes_total: 10,
    });
    h.cloud
        .ingest
        .apply_batch(&agent("web01"), b)
        .await
        .unwrap();
    let rec = h.cloud.replication.require("web01").unwrap();
    assert!(rec.lag_ms >= 5000, "{}", rec.lag_ms);
    assert_eq!(rec.state(), SystemState::InSync);
    assert_eq!(rec.filesystems[0].bytes_done, 10);
}

#[tokio::test]
async fn pending_changes_count_as_lag_until_the_pass_that_covers_them_is_durable() {
    let h = harness();
    register(&h, "web01", "10.0.0.5/24").await;
    let ingest = &h.cloud.ingest;
    let seen = ferry_common::now_ms() - 2000;
    ingest
        .progress(&agent("web01"), "web01", seen, 123)
        .unwrap();
    let s = h.cloud.replication.list("web01").unwrap().remove(0);
    assert_eq!(s.report.pending_bytes, 123);
    assert!(s.lag_seconds >= 2.0, "{}", s.lag_seconds);
    // A pass that began before the change was seen does not cover it.
    let mut b = batch("web01", 1, vec![]);
    (b.source_time_ms, b.ends_pass) = (seen - 1, true);
    ingest.apply_batch(&agent("web01"), b).await.unwrap();
    assert_eq!(
        h.cloud.replication.list("web01").unwrap()[0]
            .report
            .pending_bytes,
        123
    );
    let mut b = batch("web01", 2, vec![]);
    (b.source_time_ms, b.ends_pass) = (seen, true);
    ingest.apply_batch(&agent("web01"), b).await.unwrap();
    let s = h.cloud.replication.list("web01").unwrap().remove(0);
    assert_eq!((s.report.pending_bytes, s.lag_seconds), (0, 0.0));
}

#[tokio::test]
async fn a_report_for_an_unknown_system_is_answered_and_not_kept() {
    let h = harness();
    let ack = h
        .cloud
        .ingest
        .progress(&agent("ghost"), "ghost", 1, 1)
        .unwrap();
    assert_eq!(ack.durable_epoch, 0);
    assert!(h.cloud.replication.list("").unwrap().is_empty());
}

#[tokio::test]
async fn pause_and_rate_limit_reach_the_agent_in_every_answer() {
    let h = harness();
    register(&h, "web01", "10.0.0.5/24").await;
    let change = SettingsChange {
        paused: Some(true),
        rate_limit_bps: None,
    };
    let set = h.cloud.replication.set("web01", change).await.unwrap();
    assert!(set.paused && set.rate_limit_bps == 0);
    let ingest = &h.cloud.ingest;
    assert!(
        ingest
            .progress(&agent("web01"), "web01", 0, 0)
            .unwrap()
            .settings
            .paused
    );
    assert!(register(&h, "web01", "10.0.0.5/24").await.settings.paused);
    let b = batch("web01", 1, vec![]);
    assert!(
        ingest
            .apply_batch(&agent("web01"), b.clone())
            .await
            .unwrap()
            .settings
            .paused
    );
    // The limit changes alone; the pause stays.
    let change = SettingsChange {
        paused: None,
        rate_limit_bps: Some(1 << 20),
    };
    h.cloud.replication.set("web01", change).await.unwrap();
    let replay = ingest.apply_batch(&agent("web01"), b).await.unwrap();
    assert_eq!(
        (replay.settings.paused, replay.settings.rate_limit_bps),
        (true, 1 << 20)
    );
    let unpause = SettingsChange {
        paused: Some(false),
        rate_limit_bps: None,
    };
    let s = h.cloud.replication.set("web01", unpause).await.unwrap();
    assert_eq!((s.paused, s.rate_limit_bps), (false, 1 << 20));
}

#[tokio::test]
async fn settings_and_paths_of_an_unknown_system_are_not_found() {
    let h = harness();
    let r = h
        .cloud
        .replication
        .set("ghost", SettingsChange::default())
        .await;
    assert_eq!(kind(r), Kind::NotFound);
    register(&h, "web01", "10.0.0.5/24").await;
    assert_eq!(
        kind(h.cloud.replication.replica_path("web01", "/var")),
        Kind::NotFound
    );
    assert_eq!(kind(h.cloud.replication.list("ghost")), Kind::NotFound);
    let p = h.cloud.replication.replica_path("web01", "/").unwrap();
    assert!(p.ends_with("web01/root"));
}

#[tokio::test]
async fn missing_chunks_are_named_by_index_and_the_ask_is_bounded() {
    let h = harness();
    let ingest = &h.cloud.ingest;
    let data = b"chunk";
    let hash = *blake3::hash(data).as_bytes();
    let (z, raw) = ferry_common::chunks::compress(data);
    let frame = Frame {
        hash,
        zdata: z.into(),
        raw_len: data.len() as u32,
        raw,
    };
    let staged = ingest.stage_frame(&frame).unwrap().unwrap();
    assert_eq!(ingest.publish_chunks(vec![staged]).await.unwrap(), 1);
    // Sent again: counted as a duplicate, not stored twice.
    assert!(ingest.stage_frame(&frame).unwrap().is_none());
    assert_eq!(h.cloud.counters.snapshot().chunks_duplicate, 1);
    let missing = ingest
        .missing(vec![[7; 32], hash, [9; 32]], true)
        .await
        .unwrap();
    assert_eq!(missing, vec![0, 2]);
    let r = ingest
        .missing(vec![[0; 32]; crate::ingest::MAX_HASHES + 1], true)
        .await;
    assert_eq!(kind(r), Kind::InvalidArgument);
}

#[tokio::test]
async fn a_frame_whose_bytes_do_not_match_its_hash_is_refused() {
    let h = harness();
    let (z, raw) = ferry_common::chunks::compress(b"real");
    let frame = Frame {
        hash: *blake3::hash(b"claimed").as_bytes(),
        zdata: z.into(),
        raw_len: 4,
        raw,
    };
    assert!(h.cloud.ingest.stage_frame(&frame).is_err());
    assert_eq!(h.cloud.counters.snapshot().chunk_raw_bytes, 0);
}

#[test]
fn enrollment_takes_a_valid_token_once_and_checks_role_and_names() {
    let h = harness();
    let ingest = &h.cloud.ingest;
    let token = ferry_common::token::TokenStore::new(h.dir.path())
        .create(
            &ingest.ca.fingerprint(),
            std::time::Duration::from_secs(60),
            Scope::default(),
        )
        .unwrap();
    let (csr_pem, _key) = ferry_common::pki::new_csr().unwrap();
    let ask = |role: &str, sans: &[&str]| Enrollment {
        token: token.credential(),
        role: role.into(),
        name: "web01".into(),
        csr_pem: csr_pem.clone(),
        sans: sans.iter().map(|s| s.to_string()).collect(),
        via: None,
    };
    assert_eq!(
        kind(ingest.enroll(ask("operator", &[]))),
        Kind::InvalidArgument
    );
    assert_eq!(
        kind(ingest.enroll(ask("agent", &["web01"]))),
        Kind::InvalidArgument
    );
    assert_eq!(
        kind(ingest.enroll(ask("site", &["bad name"]))),
        Kind::InvalidArgument
    );
    // A wrong secret under the right id is refused and spends nothing.
    let mut forged = ask("agent", &[]);
    forged.token = format!("{}.{}", token.id, "0".repeat(32));
    assert_eq!(kind(ingest.enroll(forged)), Kind::PermissionDenied);
    let got = ingest.enroll(ask("agent", &[])).unwrap();
    assert!(got.cert_pem.contains("BEGIN CERTIFICATE"));
    // Spent.
    assert_eq!(
        kind(ingest.enroll(ask("agent", &[]))),
        Kind::PermissionDenied
    );
    let store = ferry_common::token::TokenStore::new(h.dir.path());
    let new_token = |name: &str| {
        let scope = Scope {
            name: name.into(),
            ..Scope::default()
        };
        let ttl = std::time::Duration::from_secs(60);
        store.create(&ingest.ca.fingerprint(), ttl, scope).unwrap()
    };
    // Any new name's token does not take a name enrolled already...
    let again = |t: &ferry_common::token::JoinToken| Enrollment {
        token: t.credential(),
        ..ask("agent", &[])
    };
    assert_eq!(
        kind(ingest.enroll(again(&new_token("")))),
        Kind::AlreadyExists
    );
    // ...a token made for that very name does, and the old certificate is revoked.
    let old = ferry_common::pki::CertInfo::from_pem(&got.cert_pem).unwrap();
    let renewed = ingest.enroll(again(&new_token("web01"))).unwrap();
    let new = ferry_common::pki::CertInfo::from_pem(&renewed.cert_pem).unwrap();
    assert!(ingest.revoked.check(&old).is_err());
    assert!(ingest.revoked.check(&new).is_ok());
}

#[tokio::test]
async fn a_mount_point_that_is_not_absolute_and_normalized_is_refused_at_the_door() {
    let h = harness();
    let long = format!("/{}", "a".repeat(4096));
    let hostile: [&[u8]; 9] = [
        b"",
        b"data",
        b"/../../../etc",
        b"/data/../etc",
        b"/a//b",
        b"/a/",
        b"/./a",
        b"/a\0b",
        long.as_bytes(),
    ];
    for mp in hostile {
        let reg = Registration {
            system: "web01".into(),
            fresh_state: false,
            probe: HostInfo::default(),
            filesystems: vec![FsRecord {
                mount_point: mp.to_vec(),
                ..root_fs()
            }],
            ..Default::default()
        };
        let r = h.cloud.ingest.register(&agent("web01"), reg).await;
        assert_eq!(
            kind(r),
            Kind::InvalidArgument,
            "{:?}",
            String::from_utf8_lossy(mp)
        );
    }
    assert!(h.cloud.replication.system("web01").unwrap().is_none());
    for ok in [&b"/"[..], b"/var/lib/pgsql", b"/srv/data 1"] {
        crate::ingest::check_mount_point(ok).unwrap();
    }
}

/// A file system's id names its replica volume's image and mount point under the data
/// dir (and the volume commands run on them): an id that is not a plain name is refused
/// before anything is made, and nothing appears outside the volumes' directory.
#[tokio::test]
async fn a_file_system_id_that_is_not_a_plain_name_is_refused_at_the_door() {
    let h = harness();
    for id in ["../escape", "a/b", "/abs", ".hidden", "", "x\0y", "-opt"] {
        let reg = Registration {
            system: "web01".into(),
            fresh_state: false,
            probe: HostInfo::default(),
            filesystems: vec![FsRecord {
                fs_id: id.into(),
                ..root_fs()
            }],
            ..Default::default()
        };
        let r = h.cloud.ingest.register(&agent("web01"), reg).await;
        assert_eq!(kind(r), Kind::InvalidArgument, "{id:?}");
    }
    assert!(h.cloud.replication.system("web01").unwrap().is_none());
    assert!(!h.dir.path().join("escape").exists());
    assert!(!h.volumes.root.join("web01").exists());
}

#[tokio::test]
async fn two_file_systems_at_one_mount_point_or_a_moved_one_are_refused() {
    let h = harness();
    let var = FsRecord {
        fs_id: "var".into(),
        mount_point: b"/var".to_vec(),
        ..root_fs()
    };
    let twice = Registration {
        system: "web01".into(),
        fresh_state: false,
        probe: HostInfo::default(),
        filesystems: vec![
            var.clone(),
            FsRecord {
                fs_id: "var2".into(),
                ..var.clone()
            },
        ],
        ..Default::default()
    };
    let r = h.cloud.ingest.register(&agent("web01"), twice).await;
    assert_eq!(kind(r), Kind::InvalidArgument);
    register(&h, "web01", "10.0.0.5/24").await;
    // The root file system says it now mounts over /etc: refused, the record unchanged.
    let moved = Registration {
        system: "web01".into(),
        fresh_state: false,
        probe: HostInfo::default(),
        filesystems: vec![FsRecord {
            mount_point: b"/etc".to_vec(),
            ..root_fs()
        }],
        ..Default::default()
    };
    let r = h.cloud.ingest.register(&agent("web01"), moved).await;
    assert_eq!(kind(r), Kind::InvalidArgument);
    let rec = h.cloud.replication.require("web01").unwrap();
    assert_eq!(rec.filesystems[0].mount_point, b"/");
    assert_eq!(rec.probe.hostname, "web01");
    // Another file system may not take a mount point one already has.
    let taken = Registration {
        system: "web01".into(),
        fresh_state: false,
        probe: HostInfo::default(),
        filesystems: vec![FsRecord {
            fs_id: "other".into(),
            ..root_fs()
        }],
        ..Default::default()
    };
    let r = h.cloud.ingest.register(&agent("web01"), taken).await;
    assert_eq!(kind(r), Kind::InvalidArgument);
}

#[tokio::test]
async fn a_moved_file_system_registers_only_once_the_operator_allows_that_move() {
    let h = harness();
    register(&h, "web01", "10.0.0.5/24").await;
    let moved = |mp: &[u8]| Registration {
        system: "web01".into(),
        fresh_state: false,
        probe: probe("web01", "10.0.0.5/24"),
        filesystems: vec![FsRecord {
            mount_point: mp.to_vec(),
            ..root_fs()
        }],
        ..Default::default()
    };
    let err = (h.cloud.ingest)
        .register(&agent("web01"), moved(b"/srv"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("allow-move"), "{err}");
    // Allowing another target, or a hostile one, lets nothing through.
    (h.cloud.replication)
        .allow_move("web01", "root", b"/opt".to_vec())
        .await
        .unwrap();
    assert!(h
        .cloud
        .ingest
        .register(&agent("web01"), moved(b"/srv"))
        .await
        .is_err());
    assert_eq!(
        kind(
            h.cloud
                .replication
                .allow_move("web01", "root", b"/../etc".to_vec())
                .await
        ),
        Kind::InvalidArgument
    );
    assert_eq!(
        kind(
            h.cloud
                .replication
                .allow_move("web01", "nope", b"/srv".to_vec())
                .await
        ),
        Kind::NotFound
    );
    (h.cloud.replication)
        .allow_move("web01", "root", b"/srv".to_vec())
        .await
        .unwrap();
    h.cloud
        .ingest
        .register(&agent("web01"), moved(b"/srv"))
        .await
        .unwrap();
    let rec = h.cloud.replication.require("web01").unwrap();
    assert_eq!(rec.filesystems[0].mount_point, b"/srv");
    assert_eq!(rec.allowed_moves, [("root".to_string(), b"/opt".to_vec())]);
    // Allowed once: moving back is refused again.
    assert!(h
        .cloud
        .ingest
        .register(&agent("web01"), moved(b"/"))
        .await
        .is_err());
}

/// A batch whose files cannot fit in the replica volume is refused before anything is
/// written, naming the way out; the same batch goes in once the volume has room.
#[tokio::test]
async fn a_batch_that_cannot_fit_its_volume_is_refused_before_anything_is_written() {
    use std::sync::atomic::Ordering;
    let h = harness();
    register(&h, "web01", "10.0.0.5/24").await;
    let ingest = &h.cloud.ingest;
    let data = vec![7u8; 64 << 10];
    let file = crate::apply::tests::stored_file(&h.chunks, b"d/big", &data);
    let b = batch("web01", 1, vec![dir_entry("d"), file]);
    h.volumes.free.store(32 << 10, Ordering::Relaxed);
    let err = ingest
        .apply_batch(&agent("web01"), b.clone())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Kind::ResourceExhausted, "{err}");
    assert!(
        err.to_string()
            .contains("ferry replica resize web01 root SIZE"),
        "{err}"
    );
    let replica = h.cloud.replication.replica_path("web01", "/").unwrap();
    assert!(!replica.join("d").exists(), "nothing is written");
    let rec = h.cloud.replication.require("web01").unwrap();
    assert_eq!(rec.durable_epoch, 0);
    assert!(
        rec.last_error.contains("replica volume of web01/root"),
        "{}",
        rec.last_error
    );
    h.volumes.free.store(1 << 20, Ordering::Relaxed);
    let ack = ingest.apply_batch(&agent("web01"), b).await.unwrap();
    assert_eq!(ack.durable_epoch, 1);
    assert_eq!(std::fs::read(replica.join("d/big")).unwrap(), data);
}

#[tokio::test]
async fn a_replica_volume_only_grows_and_only_for_a_known_file_system() {
    let h = harness();
    register(&h, "web01", "10.0.0.5/24").await;
    let repl = &h.cloud.replication;
    for (fs, size, want) in [
        ("root", 0, Kind::InvalidArgument),
        ("root", crate::ingest::MAX_VOLUME + 1, Kind::InvalidArgument),
        ("root", 1 << 30, Kind::InvalidArgument),
        ("nope", 1 << 30, Kind::NotFound),
    ] {
        let r = repl.resize("web01", fs, size).await;
        assert_eq!(kind(r), want, "{fs} {size}");
    }
    // The directory volumes report more than 1 GiB already: that is a shrink.
    let err = repl.resize("web01", "root", 1 << 30).await.unwrap_err();
    assert!(err.to_string().contains("only grows"), "{err}");
    assert_eq!(repl.require("web01").unwrap().filesystems[0].cap_bytes, 0);
    assert_eq!(
        kind(repl.resize("nobody", "root", 1 << 30).await),
        Kind::NotFound
    );
}

#[tokio::test]
async fn a_file_system_larger_than_a_replica_volume_holds_is_refused_at_the_door() {
    let h = harness();
    let reg = Registration {
        system: "web01".into(),
        fresh_state: false,
        probe: probe("web01", "10.0.0.5/24"),
        filesystems: vec![FsRecord {
            capacity_bytes: crate::ingest::MAX_VOLUME + 1,
            ..root_fs()
        }],
        ..Default::default()
    };
    let err = h
        .cloud
        .ingest
        .register(&agent("web01"), reg)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Kind::InvalidArgument);
    assert!(
        err.to_string().contains("more than a replica volume holds"),
        "{err}"
    );
    assert!(h.cloud.replication.system("web01").unwrap().is_none());
}

/// A token enrolls only the role and name it was made for, through the site it names;
/// a site relays for what its token, its agents' enrollments and the operator bind.
#[test]
fn a_token_enrolls_only_its_scope_and_binds_sites_to_their_systems() {
    let h = harness();
    let ingest = &h.cloud.ingest;
    let store = ferry_common::token::TokenStore::new(h.dir.path());
    let make = |role: &str, name: &str, systems: &[&str], site: &str| {
        store
            .create(
                &ingest.ca.fingerprint(),
                std::time::Duration::from_secs(60),
                Scope {
                    role: role.into(),
                    name: name.into(),
                    systems: systems.iter().map(|s| s.to_string()).collect(),
                    site: site.into(),
                },
            )
            .unwrap()
    };
    let (csr_pem, _key) = ferry_common::pki::new_csr().unwrap();
    let ask = |t: &ferry_common::token::JoinToken, role: &str, name: &str, via: Option<&str>| {
        Enrollment {
            token: t.credential(),
            role: role.into(),
            name: name.into(),
            csr_pem: csr_pem.clone(),
            sans: Vec::new(),
            via: via.map(|v| Identity::new(Role::Site, v).unwrap()),
        }
    };
    let refused = |e: Enrollment, says: &str| {
        let err = ingest.enroll(e).unwrap_err();
        assert_eq!(err.kind(), Kind::PermissionDenied, "{err}");
        assert!(err.to_string().contains(says), "{err}");
    };
    // An agent token is no site's, and no other system's.
    let web01 = make("agent", "web01", &[], "");
    refused(
        ask(&web01, "site", "web01", None),
        "enrolls an agent, not site:web01",
    );
    refused(
        ask(&web01, "agent", "web02", None),
        "enrolls agent:web01, not agent:web02",
    );
    // The refusals spent nothing.
    ingest.enroll(ask(&web01, "agent", "web01", None)).unwrap();
    // An unscoped token is an agent's too.
    let any = make("", "", &[], "");
    refused(ask(&any, "site", "site9", None), "not site:site9");
    // A site token names its site and what it relays for.
    let site1 = make("site", "site1", &["db01"], "");
    refused(ask(&site1, "site", "site2", None), "not site:site2");
    refused(
        ask(&site1, "site", "site1", Some("site3")),
        "sites enroll with the cloud manager",
    );
    ingest.enroll(ask(&site1, "site", "site1", None)).unwrap();
    // An agent token bound to a site comes through that site only.
    let app01 = make("agent", "app01", &[], "site1");
    refused(
        ask(&app01, "agent", "app01", Some("site2")),
        "through site:site1",
    );
    ingest
        .enroll(ask(&app01, "agent", "app01", Some("site1")))
        .unwrap();
    // An agent enrolled through a site binds it too.
    ingest
        .enroll(ask(&any, "agent", "web03", Some("site1")))
        .unwrap();
    let sites = ingest.sites().unwrap();
    assert_eq!(
        sites,
        [(
            "site1".to_string(),
            vec!["app01".to_string(), "db01".into(), "web03".into()]
        )]
    );
    let s1 = Identity::new(Role::Site, "site1").unwrap();
    ingest.authorize(&s1, "web03").unwrap();
    assert_eq!(kind(ingest.authorize(&s1, "web01")), Kind::PermissionDenied);
}

/// Sites that relayed for a system before bindings existed keep relaying for it.
#[tokio::test]
async fn sites_of_systems_from_before_bindings_are_bound_once_at_start() {
    let h = harness();
    let systems = h.cloud.replication.records();
    for (name, via) in [("web01", "site:old"), ("db01", "agent:db01")] {
        systems
            .put(&crate::state::SystemRecord {
                name: name.into(),
                via: via.into(),
                ..Default::default()
            })
            .unwrap();
    }
    h.cloud.start().await.unwrap();
    let old = Identity::new(Role::Site, "old").unwrap();
    h.cloud.ingest.authorize(&old, "web01").unwrap();
    assert_eq!(
        kind(h.cloud.ingest.authorize(&old, "db01")),
        Kind::PermissionDenied
    );
    // Once: a binding the operator changes later is not made again behind its back.
    systems
        .put(&crate::state::SystemRecord {
            name: "app01".into(),
            via: "site:old".into(),
            ..Default::default()
        })
        .unwrap();
    h.cloud.start().await.unwrap();
    assert_eq!(
        kind(h.cloud.ingest.authorize(&old, "app01")),
        Kind::PermissionDenied
    );
}

/// A renewal names no identity: it is the caller's own, or the agent whose certificate a
/// site shows, bound to that site, signed with that certificate's key, not revoked.
#[test]
fn a_renewal_is_only_for_a_certificate_whose_key_signs_it() {
    use crate::ingest::Renewal;
    use ferry_common::pki::{new_csr, pem_to_der, renewal_proof, CertInfo};
    let h = harness();
    let ingest = &h.cloud.ingest;
    let store = ferry_common::token::TokenStore::new(h.dir.path());
    let enroll = |role: &str, name: &str, systems: &[&str]| {
        let scope = Scope {
            role: role.into(),
            name: name.into(),
            systems: systems.iter().map(|s| s.to_string()).collect(),
            ..Scope::default()
        };
        let ttl = std::time::Duration::from_secs(60);
        let token = store.create(&ingest.ca.fingerprint(), ttl, scope).unwrap();
        let (csr_pem, key) = new_csr().unwrap();
        let got = ingest
            .enroll(Enrollment {
                token: token.credential(),
                role: role.into(),
                name: name.into(),
                csr_pem,
                sans: Vec::new(),
                via: None,
            })
            .unwrap();
        let der = pem_to_der(&got.cert_pem).unwrap();
        (CertInfo::from_der(&der).unwrap(), der, key)
    };
    let (site, site_der, site_key) = enroll("site", "site1", &["web01"]);
    let (_, web_der, web_key) = enroll("agent", "web01", &[]);
    let (_, db_der, db_key) = enroll("agent", "db01", &[]);
    let relayed = |der: &[u8], key: &str| {
        let (csr_pem, _) = new_csr().unwrap();
        Renewal {
            proof: renewal_proof(key, &csr_pem).unwrap(),
            csr_pem,
            sans: Vec::new(),
            agent_cert: Some(der.to_vec()),
        }
    };
    // The site relays web01's own signed request: web01 gets a certificate.
    let got = ingest
        .renew(&site, &site_der, relayed(&web_der, &web_key))
        .unwrap();
    assert_eq!(
        CertInfo::from_pem(&got.cert_pem).unwrap().identity,
        agent("web01")
    );
    // Signed by the site's key, not the agent's: refused.
    let r = ingest.renew(&site, &site_der, relayed(&web_der, &site_key));
    assert_eq!(kind(r), Kind::PermissionDenied);
    // An agent the site is not bound to: refused.
    let r = ingest.renew(&site, &site_der, relayed(&db_der, &db_key));
    assert_eq!(kind(r), Kind::PermissionDenied);
    // An agent cannot renew for another.
    let db = CertInfo::from_der(&db_der).unwrap();
    let r = ingest.renew(&db, &db_der, relayed(&web_der, &web_key));
    assert_eq!(kind(r), Kind::PermissionDenied);
    // Its own renewal, unsigned: refused; signed: done.
    let (csr_pem, _) = new_csr().unwrap();
    let unsigned = Renewal {
        csr_pem: csr_pem.clone(),
        sans: Vec::new(),
        proof: Vec::new(),
        agent_cert: None,
    };
    assert_eq!(
        kind(ingest.renew(&db, &db_der, unsigned)),
        Kind::PermissionDenied
    );
    let signed = Renewal {
        proof: renewal_proof(&db_key, &csr_pem).unwrap(),
        csr_pem,
        sans: Vec::new(),
        agent_cert: None,
    };
    assert!(ingest.renew(&db, &db_der, signed).is_ok());
    // Revoked, web01 gets nothing through its site.
    ingest.revoke(&agent("web01")).unwrap();
    let r = ingest.renew(&site, &site_der, relayed(&web_der, &web_key));
    assert_eq!(kind(r), Kind::PermissionDenied);
}

/// The chunk store forgets what the replicas hold (its packs age out); a chunk asked
/// about again, by the same system or another, is found where apply wrote it, checked
/// and copied back, so it is not sent again. Once that copy changed, it is missing.
#[tokio::test]
async fn a_chunk_the_store_forgot_is_found_again_in_a_replica_while_unchanged() {
    let h = harness();
    register(&h, "web01", "10.0.0.5/24").await;
    register(&h, "web02", "10.0.0.6/24").await;
    let ingest = &h.cloud.ingest;
    let data: Vec<u8> = (0..40_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let hash = *blake3::hash(&data).as_bytes();
    let stored = crate::apply::tests::stored_file(&h.chunks, b"f", &data);
    let file = |path: &str| Entry {
        path: path.as_bytes().to_vec(),
        ..stored.clone()
    };
    let ack = ingest
        .apply_batch(&agent("web01"), batch("web01", 1, vec![file("f")]))
        .await
        .unwrap();
    assert_eq!(ack.durable_epoch, 1);
    let forget = || assert!(h.chunks.clear(h.chunks.generation()).unwrap().is_some());
    forget();
    assert!(!h.chunks.has(&hash));
    // Another system's sender asks: web01's replica holds it.
    assert!(ingest.missing(vec![hash], true).await.unwrap().is_empty());
    assert!(
        h.chunks.has(&hash),
        "copied back for the batch that relies on it"
    );
    let ack = ingest
        .apply_batch(&agent("web02"), batch("web02", 1, vec![file("g")]))
        .await
        .unwrap();
    assert_eq!(ack.durable_epoch, 1);
    let web02 = h.cloud.replication.replica_path("web02", "/").unwrap();
    assert_eq!(std::fs::read(web02.join("g")).unwrap(), data);
    // Both copies changed behind the index's back: the hash check finds out.
    forget();
    let web01 = h.cloud.replication.replica_path("web01", "/").unwrap();
    std::fs::write(web01.join("f"), vec![0u8; data.len()]).unwrap();
    std::fs::write(web02.join("g"), b"short").unwrap();
    assert_eq!(ingest.missing(vec![hash], true).await.unwrap(), [0]);
    // A batch relying on a chunk that is gone is refused as such (its sender asks
    // again and uploads it), and nothing of it is applied.
    let r = ingest
        .apply_batch(&agent("web02"), batch("web02", 2, vec![file("h")]))
        .await;
    assert_eq!(kind(r), Kind::FailedPrecondition);
    assert!(!web02.join("h").exists());
    let rec = h.cloud.replication.system("web02").unwrap().unwrap();
    assert_eq!(rec.durable_epoch, 1);
}

/// A file of one chunk per part of `data`, whose chunks the store is given first.
async fn chunked_file(h: &Harness, path: &str, data: &[&[u8]], mtime_sec: i64) -> Entry {
    let ingest = &h.cloud.ingest;
    let mut chunks = Vec::new();
    for part in data {
        let (z, raw) = ferry_common::chunks::compress(part);
        let hash = *blake3::hash(part).as_bytes();
        let frame = Frame {
            hash,
            zdata: z.into(),
            raw_len: part.len() as u32,
            raw,
        };
        if let Some(s) = ingest.stage_frame(&frame).unwrap() {
            ingest.publish_chunks(vec![s]).await.unwrap();
        }
        chunks.push(ferry_proto::v1::ChunkRef {
            hash: hash.to_vec(),
            len: part.len() as u32,
        });
    }
    // Owned like the directory entries, by whoever runs the tests.
    Entry {
        kind: EntryKind::File as i32,
        mode: 0o100644,
        mtime_sec,
        size: data.iter().map(|d| d.len() as u64).sum(),
        segments: vec![ferry_proto::v1::Segment { offset: 0, chunks }],
        ..dir_entry(path)
    }
}

#[tokio::test]
async fn chunk_places_follow_the_replicas_files_and_go_with_their_system() {
    let h = harness();
    register(&h, "web01", "10.0.0.5/24").await;
    let (a, b, b2) = (vec![1u8; 9000], vec![2u8; 9000], vec![3u8; 12000]);
    let entries = vec![
        chunked_file(&h, "a", &[&a], 1_600_000_000).await,
        chunked_file(&h, "b", &[&b], 1_600_000_000).await,
    ];
    let ingest = &h.cloud.ingest;
    ingest
        .apply_batch(&agent("web01"), batch("web01", 1, entries))
        .await
        .unwrap();
    // b is written again with other contents (and the source's time, unchanged).
    let again = chunked_file(&h, "b", &[&b2], 1_600_000_000).await;
    ingest
        .apply_batch(&agent("web01"), batch("web01", 2, vec![again]))
        .await
        .unwrap();
    let swept = ingest.sweep_places(|| false).unwrap();
    assert_eq!((swept.kept, swept.dropped), (2, 1), "{swept:?}");
    // What is left still lets a lost chunk be found in the replica again.
    let mut want = vec![*blake3::hash(&a).as_bytes(), *blake3::hash(&b).as_bytes()];
    want.push(*blake3::hash(&b2).as_bytes());
    h.cloud
        .ingest
        .chunks
        .clear(h.cloud.ingest.chunks.generation())
        .unwrap();
    assert_eq!(ingest.missing(want, false).await.unwrap(), vec![1]);
    // A removed system's places go with it.
    h.cloud.remove_system("web01").await.unwrap();
    let swept = ingest.sweep_places(|| false).unwrap();
    assert_eq!((swept.kept, swept.dropped), (0, 2), "{swept:?}");
}
