//! Identities end: certificates expire and renew over the live link while replication
//! goes on, and a removed system, a revoked site or a revoked operator is refused at the
//! handshake or before any handler runs, also on a connection opened before.
use anyhow::Result;
use ferry_common::pki::{Ca, CertInfo, Identity, IdentityFiles, Lifetimes, Role};
use ferry_proto::v1 as pb;
use ferry_tests::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tonic::Code;

fn cert_in(dir: &Path) -> Result<CertInfo> {
    Ok(CertInfo::from_pem(&std::fs::read_to_string(
        dir.join("cert.pem"),
    )?)?)
}

fn creds_cert(path: &Path) -> Result<CertInfo> {
    let c: ferry_common::config::OperatorCredentials =
        toml::from_str(&std::fs::read_to_string(path)?)?;
    Ok(CertInfo::from_pem(&c.cert_pem)?)
}

/// Sleeps until the Unix time `at`.
fn sleep_until(at: u64) {
    let now = ferry_common::pki::unix_now();
    if at > now {
        std::thread::sleep(Duration::from_secs(at - now));
    }
}

/// `ferry --credentials CREDS ARGS`: whether it worked, and what it said on stderr.
fn ferry_as(creds: &Path, args: &[&str]) -> Result<(bool, String)> {
    let out = output(
        Command::new(bin("ferry"))
            .arg("--credentials")
            .arg(creds)
            .args(args),
    )?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// A control client that presents the operator certificate in `creds`.
fn control_as(
    creds: &Path,
) -> Result<pb::control_client::ControlClient<tonic::transport::Channel>> {
    let c: ferry_common::config::OperatorCredentials =
        toml::from_str(&std::fs::read_to_string(creds)?)?;
    let cfg = ferry_common::tls::client_config(
        &c.ca_pem,
        &c.cert_pem,
        c.key_pem.expose(),
        &[Role::Cloud],
    )?;
    Ok(pb::control_client::ControlClient::new(
        ferry_common::tls::channel(&c.endpoint, cfg)?,
    ))
}

fn write_tree(root: &Path, tag: &str) -> Result<()> {
    std::fs::create_dir_all(root.join("data"))?;
    for i in 0..20 {
        std::fs::write(
            root.join(format!("data/f{i}")),
            format!("{tag} {i}\n").repeat(2000),
        )?;
    }
    Ok(())
}

/// Certificates living 30 s: the agents (one direct, one through a site), the site, the
/// cloud manager's own and the operator's are all renewed before they end, so
/// replication and control go on past the end of every first certificate without a
/// restart or a resend; a certificate that has expired is refused on Ingest and Control.
#[tokio::test(flavor = "multi_thread")]
async fn certificates_renew_while_replicating_and_expired_ones_are_refused() -> Result<()> {
    let tmp = scratch("renewal")?;
    let t = tmp.path();
    let cloud = CloudMgr::start_args(&t.join("cloud"), &["--cert-lifetime", "30s"])?;
    let admin = creds_cert(&cloud.creds())?;
    assert_eq!(admin.expires - admin.issued, 30, "{admin:?}");
    let site = SiteMgr::start(&t.join("site"), &cloud.url(), Some(&cloud.site_token()?))?;
    let (src_a, src_b) = (t.join("src-a"), t.join("src-b"));
    write_tree(&src_a, "alpha")?;
    write_tree(&src_b, "beta")?;
    // An agent following `src` as `name` through `manager`, its state in `t/dir`.
    let follower = |dir: &str, manager: &str, token: Option<&str>, src: &Path, name: &str| {
        let mut cmd = agent_follow_cmd(&t.join(dir), manager, token, src, name);
        Proc::spawn(&mut cmd, &t.join(format!("{dir}.log")))
    };
    let mut a = follower(
        "agent-a",
        &cloud.url(),
        Some(&cloud.token()?),
        &src_a,
        "alpha",
    )?;
    let mut b = follower(
        "agent-b",
        &site.url(),
        Some(&cloud.token()?),
        &src_b,
        "beta",
    )?;
    wait_for("both systems registered", Duration::from_secs(30), || {
        cloud.replica_path("alpha", "/").is_ok() && cloud.replica_path("beta", "/").is_ok()
    })?;
    let both_converge = || -> Result<()> {
        for (src, name) in [(&src_a, "alpha"), (&src_b, "beta")] {
            converged_within(
                src,
                &cloud.replica_path(name, "/")?,
                Duration::from_secs(30),
            )?;
        }
        Ok(())
    };
    both_converge()?;
    let firsts = [
        cert_in(&t.join("agent-a/identity"))?,
        cert_in(&t.join("agent-b/identity"))?,
        cert_in(&t.join("site/identity"))?,
    ];
    // Chunks and the small files that came inline.
    let crossed = || -> Result<u64> {
        Ok(cloud.counter("chunk_wire_bytes")? + cloud.counter("inline_file_bytes")?)
    };
    let wire = crossed()?;

    // With a third of its life left, the operator's certificate is renewed by `ferry`.
    sleep_until(admin.issued + 21);
    let (ok, said) = ferry_as(&cloud.creds(), &["sync", "status"])?;
    assert!(
        ok && said.contains("renewed the certificate of operator:admin"),
        "{said}"
    );
    let renewed = creds_cert(&cloud.creds())?;
    assert!(renewed.expires > admin.expires, "{renewed:?}");

    // Past the end of every first certificate, the cloud manager's own included.
    let last = firsts.iter().map(|c| c.expires).max().unwrap_or(0);
    sleep_until(last.max(admin.expires) + 3);
    for (dir, first) in ["agent-a", "agent-b", "site"].iter().zip(&firsts) {
        let now = cert_in(&t.join(dir).join("identity"))?;
        assert_eq!(now.identity, first.identity);
        assert!(
            now.expires > first.expires,
            "{dir} was not renewed: {now:?}"
        );
    }
    assert!(a.child.try_wait()?.is_none() && b.child.try_wait()?.is_none());
    // Both still replicate, over connections with the renewed certificates, and only
    // the new data crosses.
    for (src, tag) in [(&src_a, "alpha"), (&src_b, "beta")] {
        std::fs::write(
            src.join("data/new"),
            format!("{tag} after renewal\n").repeat(100),
        )?;
    }
    both_converge()?;
    let resent = crossed()? - wire;
    assert!(resent < 64 << 10, "{resent} bytes crossed after renewal");
    let renewals = std::fs::read_to_string(t.join("agent-b.log"))?
        .matches("certificate renewed")
        .count();
    assert!(renewals >= 1, "the agent behind the site never renewed");
    // A restart keeps the renewed identity: no token, and it still gets in.
    a.stop()?;
    a = follower("agent-a", &cloud.url(), None, &src_a, "alpha")?;
    std::fs::write(src_a.join("data/after-restart"), b"restarted")?;
    converged_within(
        &src_a,
        &cloud.replica_path("alpha", "/")?,
        Duration::from_secs(30),
    )?;

    // A certificate that has expired gets nowhere, on Ingest or Control.
    let ca = Ca::load_or_create(&cloud.dir.join("pki"), Lifetimes::default().ca)?;
    let short = Duration::from_secs(1);
    let (cert, key) = ca.issue(&Identity::new(Role::Agent, "alpha")?, &[], short)?;
    let (op_cert, op_key) = ca.issue(&Identity::new(Role::Operator, "late")?, &[], short)?;
    std::thread::sleep(Duration::from_secs(2));
    let cfg = ferry_common::tls::client_config(ca.pem(), &cert, &key, &[Role::Cloud])?;
    let why = ferry_common::tls::handshake_refusal(&cloud.url(), cfg.clone()).await;
    assert_eq!(why, Some("expired"));
    let mut stale =
        pb::ingest_client::IngestClient::new(ferry_common::tls::channel(&cloud.url(), cfg)?);
    let epoch = cloud.ferry_json(&["systems", "show", "alpha"])?["durable_epoch"].clone();
    assert!(stale
        .register(register("alpha", "0a1b2c3d-0000-4000-8000-0000000000ee"))
        .await
        .is_err());
    let cfg = ferry_common::tls::client_config(ca.pem(), &op_cert, &op_key, &[Role::Cloud])?;
    let why = ferry_common::tls::handshake_refusal(&cloud.url(), cfg.clone()).await;
    assert_eq!(why, Some("expired"));
    let mut late =
        pb::control_client::ControlClient::new(ferry_common::tls::channel(&cloud.url(), cfg)?);
    assert!(late
        .list_systems(pb::ListSystemsRequest::default())
        .await
        .is_err());
    let shown = cloud.ferry_json(&["systems", "show", "alpha"])?;
    assert_eq!(shown["durable_epoch"], epoch, "{shown}");
    assert_eq!(
        shown["filesystems"].as_array().map(Vec::len),
        Some(1),
        "{shown}"
    );
    // `ferry` says so before it dials.
    let creds = ferry_common::config::OperatorCredentials {
        endpoint: cloud.url(),
        ca_pem: ca.pem().into(),
        cert_pem: op_cert,
        key_pem: ferry_common::config::Secret::new(op_key),
    };
    let late_creds = t.join("late.toml");
    std::fs::write(&late_creds, toml::to_string(&creds)?)?;
    let (ok, said) = ferry_as(&late_creds, &["systems", "list"])?;
    assert!(!ok && said.contains("has expired"), "{said}");
    a.stop()?;
    b.stop()?;
    Ok(())
}

/// `ferry systems remove`, `ferry sites revoke` and `ferry operators revoke`: every
/// later call with a certificate of that identity is refused, on a connection opened
/// before as on a new one, also by the site for an agent; nothing is written; the
/// revocations and the operator's credentials outlive a restart unchanged.
#[tokio::test(flavor = "multi_thread")]
async fn removed_systems_and_revoked_sites_and_operators_are_refused() -> Result<()> {
    let tmp = scratch("revocation")?;
    let t = tmp.path();
    let mut cloud = CloudMgr::start(&t.join("cloud"))?;
    let admin_file = std::fs::read(cloud.creds())?;

    // gamma: a client kept connected across its removal.
    let fs = "0a1b2c3d-0000-4000-8000-0000000000c1";
    let mut gamma =
        enrolled_client(&cloud.url(), &cloud.token()?, "gamma", &t.join("gamma")).await?;
    gamma.register(register("gamma", fs)).await?;
    let dir = |name: &[u8], epoch| {
        let entry = pb::Entry {
            path: name.to_vec(),
            kind: pb::EntryKind::Dir as i32,
            mode: 0o40755,
            ..Default::default()
        };
        pb::Batch {
            system: "gamma".into(),
            fs_id: fs.into(),
            epoch,
            entries: vec![entry],
            ..Default::default()
        }
    };
    gamma.apply_batch(dir(b"kept", 1)).await?;
    let volume = cloud.dir.join("volumes/gamma");
    assert!(volume.is_dir());

    // An app's system is not removed.
    let src = t.join("src");
    write_tree(&src, "alpha")?;
    cloud.replicate(t, &src, "alpha")?;
    cloud.ferry_json(&["app", "create", "shop", "--system", "alpha:private"])?;
    let said = cloud.ferry_fails(&["systems", "remove", "alpha", "--yes"]);
    assert!(said.contains("part of app(s) shop"), "{said}");
    assert!(cloud.replica_path("alpha", "/")?.join("data/f1").is_file());
    let said = cloud.ferry_fails(&["systems", "remove", "gamma"]);
    assert!(said.contains("--yes"), "{said}");

    // alpha's agent loses its identity (or lets it expire): any new name's token does
    // not take its name back; a token made for it does, the replica stays, and the
    // old certificate is revoked.
    let state = t.join("agent-alpha");
    let (ca_pem, old_cert, old_key) = IdentityFiles::new(&state.join("identity")).load()?;
    std::fs::remove_dir_all(state.join("identity"))?;
    std::fs::write(src.join("data/after-reenroll"), b"back")?;
    let err = agent_once(&state, &cloud.url(), Some(&cloud.token()?), &src, "alpha")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("already enrolled"), "{err}");
    let token = cloud.token_with(&["--system", "alpha"])?;
    agent_once(&state, &cloud.url(), Some(&token), &src, "alpha")?;
    let replica = cloud.replica_path("alpha", "/")?;
    assert!(replica.join("data/f1").is_file() && replica.join("data/after-reenroll").is_file());
    let cfg = ferry_common::tls::client_config(&ca_pem, &old_cert, &old_key, &[Role::Cloud])?;
    let why = ferry_common::tls::handshake_refusal(&cloud.url(), cfg).await;
    assert_eq!(why, Some("revoked"));

    let out = sh(Command::new(bin("ferry"))
        .arg("--credentials")
        .arg(cloud.creds())
        .args(["systems", "remove", "gamma", "--yes"]))?;
    assert!(out.contains("agent:gamma revoked"), "{out}");
    let err = gamma.apply_batch(dir(b"after", 2)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("revoked"), "{err:?}");
    let mut fresh = pb::ingest_client::IngestClient::new(ferry_common::enroll::mtls_channel(
        &cloud.url(),
        &IdentityFiles::new(&t.join("gamma")),
    )?);
    assert!(fresh.register(register("gamma", fs)).await.is_err());
    assert!(!volume.exists(), "the replica volume is left");
    let list = cloud.ferry_json(&["systems", "list"])?;
    assert!(!list.to_string().contains("gamma"), "{list}");
    let said = cloud.ferry_fails(&["systems", "remove", "gamma", "--yes"]);
    assert!(said.contains("no system named"), "{said}");

    // beta, through a site: once removed, the site refuses its agent too.
    let site = SiteMgr::start(&t.join("site"), &cloud.url(), Some(&cloud.site_token()?))?;
    let src_b = t.join("src-b");
    write_tree(&src_b, "beta")?;
    agent_once(
        &t.join("agent-b"),
        &site.url(),
        Some(&cloud.token()?),
        &src_b,
        "beta",
    )?;
    cloud.ferry_json(&["systems", "show", "beta"])?;
    sh(Command::new(bin("ferry"))
        .arg("--credentials")
        .arg(cloud.creds())
        .args(["systems", "remove", "beta", "--yes"]))?;
    let mut said = String::new();
    wait_for(
        "the site to refuse the removed agent",
        Duration::from_secs(40),
        || {
            let out = output(
                Command::new("timeout")
                    .arg("10")
                    .arg(bin("ferry-agent"))
                    .args(["run", "--once", "--name", "beta", "--state-dir"])
                    .arg(t.join("agent-b"))
                    .arg("--manager")
                    .arg(site.url())
                    .arg("--root")
                    .arg(&src_b),
            );
            said = out
                .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                .unwrap_or_default();
            said.contains("revoked") || said.contains("CertificateRevoked")
        },
    )?;
    assert!(cloud.replica_path("beta", "/").is_err(), "{said}");

    // The site itself: revoked, it relays for nothing and its calls are refused.
    let out = sh(Command::new(bin("ferry"))
        .arg("--credentials")
        .arg(cloud.creds())
        .args(["sites", "revoke", "site1"]))?;
    assert!(out.contains("site:site1 revoked"), "{out}");
    let sites = cloud.ferry_json(&["sites", "list"])?;
    assert!(!sites.to_string().contains("site1"), "{sites}");
    // Its certificate is refused at the handshake, as revoked.
    let (ca, cert, key) = IdentityFiles::new(&t.join("site/identity")).load()?;
    let cfg = ferry_common::tls::client_config(&ca, &cert, &key, &[Role::Cloud])?;
    let why = ferry_common::tls::handshake_refusal(&cloud.url(), cfg).await;
    assert_eq!(why, Some("revoked"));

    // A named operator of its own, then revoked: its open connection and the CLI fail.
    let bob = sh(Command::new(bin("ferry-cloud"))
        .args(["operator", "add", "bob", "--data-dir"])
        .arg(&cloud.dir))?;
    let bob = std::path::PathBuf::from(bob.trim());
    assert_eq!(creds_cert(&bob)?.identity.to_string(), "operator:bob");
    let (ok, said) = ferry_as(&bob, &["systems", "list"])?;
    assert!(ok, "{said}");
    let mut bob_client = control_as(&bob)?;
    bob_client
        .list_systems(pb::ListSystemsRequest::default())
        .await?;
    let said = cloud.ferry_fails(&["operators", "revoke", "admin"]);
    assert!(said.contains("cannot revoke itself"), "{said}");
    sh(Command::new(bin("ferry"))
        .arg("--credentials")
        .arg(cloud.creds())
        .args(["operators", "revoke", "bob"]))?;
    let err = bob_client
        .list_systems(pb::ListSystemsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("revoked"), "{err:?}");
    let (ok, said) = ferry_as(&bob, &["systems", "list"])?;
    assert!(
        !ok && said.contains("refused this operator's certificate (revoked)"),
        "{said}"
    );
    let revoked = cloud.ferry_json(&["revocations"])?;
    for id in ["agent:gamma", "agent:beta", "site:site1", "operator:bob"] {
        assert!(revoked.to_string().contains(id), "{revoked}");
    }

    // A restart mints nothing and forgets nothing.
    cloud.restart()?;
    assert_eq!(
        std::fs::read(cloud.creds())?,
        admin_file,
        "operator.toml was rewritten"
    );
    let (ok, _) = ferry_as(&bob, &["systems", "list"])?;
    assert!(!ok, "bob's revocation was forgotten");
    let mut fresh = pb::ingest_client::IngestClient::new(ferry_common::enroll::mtls_channel(
        &cloud.url(),
        &IdentityFiles::new(&t.join("gamma")),
    )?);
    assert!(fresh.register(register("gamma", fs)).await.is_err());
    cloud.ferry_json(&["systems", "show", "alpha"])?;
    Ok(())
}
