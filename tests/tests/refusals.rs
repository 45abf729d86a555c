//! Refusals: unenrolled and foreign clients, used and wrong tokens, impersonation,
//! hostile paths, oversized and malformed frames. Each gets a clear error, and nothing
//! lands outside the replica root.
use anyhow::{Context as _, Result};
use bytes::{Buf, BufMut, Bytes};
use ferry_common::pki::{IdentityFiles, Role};
use ferry_common::token::JoinToken;
use ferry_proto::v1::{self as pb, ingest_client::IngestClient};
use ferry_tests::*;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Code;

fn ca_pem(cloud: &CloudMgr) -> Result<String> {
    Ok(std::fs::read_to_string(cloud.dir.join("pki/ca.pem"))?)
}

fn entry(path: &[u8], kind: pb::EntryKind) -> pb::Entry {
    pb::Entry {
        path: path.to_vec(),
        kind: kind as i32,
        mode: 0o100644,
        ..Default::default()
    }
}

fn batch(system: &str, fs: &str, epoch: u64, entries: Vec<pb::Entry>) -> pb::Batch {
    pb::Batch {
        system: system.into(),
        epoch,
        fs_id: fs.into(),
        entries,
        ..Default::default()
    }
}

/// Sends raw bytes as a gRPC message body, to test the server's decoder.
#[derive(Debug, Clone, Default)]
struct RawCodec;
struct RawEnc;
struct RawDec;

impl Encoder for RawEnc {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawDec {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEnc;
    type Decoder = RawDec;
    fn encoder(&mut self) -> RawEnc {
        RawEnc
    }
    fn decoder(&mut self) -> RawDec {
        RawDec
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_and_unauthorized_requests_are_refused() -> Result<()> {
    let tmp = scratch("refuse")?;
    let t = tmp.path();
    let cloud = CloudMgr::start(&t.join("cloud"))?;
    let outside = t.join("outside");
    std::fs::create_dir_all(&outside)?;

    // Unenrolled: TLS without a client certificate reaches no service but enrollment.
    let anon = ferry_common::tls::channel(
        &cloud.url(),
        ferry_common::tls::anonymous_client_config(&ca_pem(&cloud)?)?,
    )?;
    let err = IngestClient::new(anon.clone())
        .register(register("alpha", "0a1b2c3d-0000-4000-8000-00000000000a"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("enroll"), "{err:?}");
    let err = pb::control_client::ControlClient::new(anon)
        .list_systems(pb::ListSystemsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // A certificate from another CA does not get through the handshake.
    let life = ferry_common::pki::Lifetimes::default();
    let rogue = ferry_common::pki::Ca::load_or_create(&t.join("rogue"), life.ca)?;
    let (cert, key) = rogue.issue(
        &ferry_common::pki::Identity::new(Role::Agent, "alpha")?,
        &[],
        life.leaf,
    )?;
    let cfg = ferry_common::tls::client_config(&ca_pem(&cloud)?, &cert, &key, &[Role::Cloud])?;
    let err = IngestClient::new(ferry_common::tls::channel(&cloud.url(), cfg)?)
        .register(register("alpha", "0a1b2c3d-0000-4000-8000-00000000000a"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled
        ),
        "{err:?}"
    );

    // Enrollment: a token works once; a used, forged or wrongly pinned token fails clearly.
    let token = cloud.token()?;
    let mut alpha = enrolled_client(&cloud.url(), &token, "alpha", &t.join("alpha")).await?;
    // An agent's certificate opens no control call: the operator check stands in front
    // of the whole service, reads and changes alike.
    let files = IdentityFiles::new(&t.join("alpha"));
    let mut control = pb::control_client::ControlClient::new(ferry_common::enroll::mtls_channel(
        &cloud.url(),
        &files,
    )?);
    let refused = [
        control
            .list_systems(pb::ListSystemsRequest::default())
            .await
            .err(),
        control.list_apps(pb::ListAppsRequest {}).await.err(),
        control
            .delete_image(pb::DeleteImageRequest { id: "x".into() })
            .await
            .err(),
        control
            .terminate_clone(pb::CloneRequest { name: "x".into() })
            .await
            .err(),
    ];
    for err in refused {
        let err = err.context("an agent used the control api")?;
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        assert!(
            err.message().contains("may not use the control api"),
            "{err:?}"
        );
    }
    let again = enrolled_client(&cloud.url(), &token, "gamma", &t.join("gamma"))
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        again.contains("join token is unknown, already used or expired"),
        "{again}"
    );
    let tok = JoinToken::parse(&cloud.token()?)?;
    let forged = format!(
        "ferry1.{}.{}.{}",
        tok.id,
        "0".repeat(32),
        tok.ca_fingerprint
    );
    let e = enrolled_client(&cloud.url(), &forged, "delta", &t.join("delta"))
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("join token is unknown"), "{e}");
    let wrong_pin = format!(
        "ferry1.{}.{}.{}",
        tok.id,
        tok.secret.expose(),
        "ab".repeat(32)
    );
    let e = enrolled_client(&cloud.url(), &wrong_pin, "delta", &t.join("delta2"))
        .await
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(!e.is_empty(), "enrollment against an unpinned ca succeeded");
    let dup = enrolled_client(&cloud.url(), &cloud.token()?, "alpha", &t.join("alpha2"))
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(dup.contains("already enrolled"), "{dup}");
    // The agent binary says the same in one line and exits non-zero.
    let out = agent_cmd(
        &t.join("reuse"),
        &cloud.url(),
        Some(&token),
        &outside,
        "epsilon",
    )
    .output()?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already used"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Impersonation: alpha may not register or write beta.
    let fs = "0a1b2c3d-0000-4000-8000-00000000000a";
    let err = alpha.register(register("beta", fs)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // A mount point that climbs out, or a symlink-shaped detour, is refused before
    // anything is stored or mounted.
    for hostile in [&b"/../../../etc"[..], b"data", b"/srv//x", b"/a\0b"] {
        let mut req = register("alpha", fs);
        req.filesystems[0].mount_point = hostile.to_vec();
        let err = alpha.register(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("mount point"), "{err:?}");
    }
    let none = cloud.ferry_json(&["systems", "list"])?;
    assert!(none.as_array().is_some_and(|a| a.is_empty()), "{none}");
    alpha.register(register("alpha", fs)).await?;
    // Registered at /, the file system cannot be moved over /etc later.
    let mut moved = register("alpha", fs);
    moved.filesystems[0].mount_point = b"/srv".to_vec();
    let err = alpha.register(moved.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("allow-move"), "{err:?}");
    // The operator allows that one move (through the CLI), once; a hostile target is
    // refused like a registration.
    let allow = |to: &str| {
        output(
            std::process::Command::new(bin("ferry"))
                .arg("--credentials")
                .arg(cloud.creds())
                .args(["replica", "allow-move", "alpha", fs, to]),
        )
    };
    assert!(!allow("/../etc")?.status.success());
    assert!(allow("/srv")?.status.success());
    alpha.register(moved.clone()).await?;
    assert!(
        alpha.register(register("alpha", fs)).await.is_err(),
        "moved back without being allowed"
    );
    assert!(allow("/")?.status.success());
    alpha.register(register("alpha", fs)).await?;
    let err = alpha
        .apply_batch(batch("beta", fs, 1, vec![entry(b"x", pb::EntryKind::File)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // Hostile paths.
    for bad in [
        &b"../escape"[..],
        b"a/../../escape",
        b"/etc/evil",
        b"a//b",
        b"x\0y",
    ] {
        let err = alpha
            .apply_batch(batch("alpha", fs, 1, vec![entry(bad, pb::EntryKind::File)]))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{:?}: {err:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let mut hl = entry(b"stolen", pb::EntryKind::Hardlink);
    hl.link_target = b"../../../etc/passwd".to_vec();
    let err = alpha
        .apply_batch(batch("alpha", fs, 1, vec![hl]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // A symlink is stored as data, never followed by later writes.
    let mut link = entry(b"link", pb::EntryKind::Symlink);
    link.link_target = outside.as_os_str().as_encoded_bytes().to_vec();
    alpha
        .apply_batch(batch("alpha", fs, 1, vec![link.clone()]))
        .await?;
    // Writing through it is never done: the replica holds a symlink where the batch
    // needs a directory, so it takes nothing and asks for a resync instead.
    let mut dir_over_link = entry(b"link/sub", pb::EntryKind::Dir);
    dir_over_link.mode = 0o40755;
    let mut epoch = 2;
    for through in [entry(b"link/pwned", pb::EntryKind::File), dir_over_link] {
        let ack = alpha
            .apply_batch(batch("alpha", fs, epoch, vec![through]))
            .await?
            .into_inner();
        assert_eq!(ack.settings.map(|s| s.resync_from), Some(epoch), "{ack:?}");
        assert_eq!(
            std::fs::read_dir(&outside)?.count(),
            0,
            "written through a symlink"
        );
        // The agent's resync keeps the symlink a symlink.
        let resync = pb::Batch {
            resync_for: epoch,
            ends_pass: true,
            ..batch("alpha", fs, epoch + 1, vec![link.clone()])
        };
        let ack = alpha.apply_batch(resync).await?.into_inner();
        assert_eq!(ack.settings.map(|s| s.resync_from), Some(0), "{ack:?}");
        epoch += 2;
    }

    // Inline contents that are not the file's size, over the limit, or on a kind that
    // carries none: refused whole, nothing written (a receiver must never write a file
    // other than what was read).
    let inline = |name: &[u8], kind: pb::EntryKind, size: u64, data: Vec<u8>| pb::Entry {
        size,
        data,
        ..entry(name, kind)
    };
    let max = u64::from(ferry_common::entry::INLINE_MAX);
    for hostile in [
        inline(b"short", pb::EntryKind::InlineFile, 10, b"abc".to_vec()),
        inline(b"long", pb::EntryKind::InlineFile, 1, b"abc".to_vec()),
        inline(
            b"over",
            pb::EntryKind::InlineFile,
            max + 1,
            vec![1; max as usize + 1],
        ),
        inline(b"onfile", pb::EntryKind::File, 3, b"abc".to_vec()),
    ] {
        let name = String::from_utf8_lossy(&hostile.path).into_owned();
        let err = alpha
            .apply_batch(batch("alpha", fs, epoch, vec![hostile]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
        assert!(
            !cloud.replica_path("alpha", "/")?.join(&name).exists(),
            "{name} was written"
        );
    }

    // Oversized frame: refused by the size limit, not buffered.
    let mut big = entry(b"big", pb::EntryKind::File);
    big.xattrs.push(pb::Xattr {
        name: b"user.big".to_vec(),
        value: vec![7; 20 << 20],
    });
    let err = alpha
        .apply_batch(batch("alpha", fs, epoch, vec![big]))
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{err:?}"
    );

    // Malformed protobuf.
    let files = IdentityFiles::new(&t.join("alpha"));
    let mut grpc =
        tonic::client::Grpc::new(ferry_common::enroll::mtls_channel(&cloud.url(), &files)?);
    grpc.ready().await?;
    let path = http::uri::PathAndQuery::from_static("/ferry.v1.Ingest/ApplyBatch");
    let garbage = Bytes::from_static(b"\xff\xff\xff\xff\xff\x0f\x12\x99garbage");
    let err = grpc
        .unary(tonic::Request::new(garbage), path, RawCodec)
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::Internal | Code::InvalidArgument),
        "{err:?}"
    );

    // The server is unharmed, and nothing escaped the replica root.
    let replica = cloud.replica_path("alpha", "/")?;
    let mut ok_file = entry(b"fine", pb::EntryKind::File);
    ok_file.mtime_sec = 1_000_000;
    alpha
        .apply_batch(batch("alpha", fs, epoch, vec![ok_file]))
        .await?;
    assert!(replica.join("fine").exists());
    assert_eq!(
        std::fs::read_dir(&outside)?.count(),
        0,
        "something was written outside the replica"
    );
    for name in ["escape", "evil", "pwned", "stolen"] {
        assert!(
            !t.join("cloud").join(name).exists() && !t.join(name).exists(),
            "{name} escaped"
        );
    }
    assert!(cloud.counter("refused_requests")? >= 8);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_site_refuses_hostile_frames_before_queueing_them() -> Result<()> {
    let tmp = scratch("refuse-site")?;
    let t = tmp.path();
    let cloud = CloudMgr::start(&t.join("cloud"))?;
    let site = SiteMgr::start(&t.join("site"), &cloud.url(), Some(&cloud.site_token()?))?;
    let mut alpha =
        enrolled_client(&site.url(), &cloud.token()?, "alpha", &t.join("alpha")).await?;
    let fs = "0a1b2c3d-0000-4000-8000-00000000000a";
    alpha.register(register("alpha", fs)).await?;
    let err = alpha.register(register("beta", fs)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = alpha
        .apply_batch(batch(
            "alpha",
            fs,
            1,
            vec![entry(b"../escape", pb::EntryKind::File)],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = alpha
        .apply_batch(batch("beta", fs, 1, vec![entry(b"x", pb::EntryKind::File)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let anon = ferry_common::tls::channel(
        &site.url(),
        ferry_common::tls::anonymous_client_config(&ca_pem(&cloud)?)?,
    )?;
    let err = IngestClient::new(anon)
        .register(register("alpha", fs))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    // Another site, enrolled with a token of its own, cannot relay through this one (it
    // would write under this site's bindings).
    let other = t.join("site2-id");
    enrolled_as(
        Role::Site,
        &cloud.url(),
        &cloud.token_with(&["--role", "site", "--name", "site2"])?,
        "site2",
        &other,
    )
    .await?;
    let (ca, cert, key) = IdentityFiles::new(&other).load()?;
    let cfg = ferry_common::tls::client_config(&ca, &cert, &key, &[Role::Site])?;
    let mut via = IngestClient::new(ferry_common::tls::channel(&site.url(), cfg)?);
    let err = via.register(register("alpha", fs)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = via
        .apply_batch(batch(
            "alpha",
            fs,
            9,
            vec![entry(b"x", pb::EntryKind::File)],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    Ok(())
}

/// A source whose root holds `data -> /etc` and a second file system at `/data`: the
/// customization of its copy refuses to place that file system, naming it, and nothing
/// under the host's /etc changes or gets mounted over.
#[tokio::test(flavor = "multi_thread")]
async fn a_root_symlink_where_a_file_system_mounts_is_refused_and_the_host_is_untouched(
) -> Result<()> {
    let tmp = scratch("symlink-mount")?;
    let t = tmp.path();
    let cloud = CloudMgr::start(&t.join("cloud"))?;
    let (root_fs, data_fs) = (
        "0a1b2c3d-0000-4000-8000-0000000000d1",
        "0a1b2c3d-0000-4000-8000-0000000000d2",
    );
    let mut gamma =
        enrolled_client(&cloud.url(), &cloud.token()?, "gamma", &t.join("gamma")).await?;
    let mut req = register("gamma", root_fs);
    let mut data = req.filesystems[0].clone();
    data.fs_id = data_fs.into();
    data.uuid = data_fs.into();
    data.mount_point = b"/data".to_vec();
    data.device = "/dev/sdb1".into();
    req.filesystems.push(data);
    gamma.register(req).await?;
    let dir = |p: &[u8], children: &[&[u8]]| pb::Entry {
        mode: 0o40755,
        children: children.iter().map(|c| c.to_vec()).collect(),
        ..entry(p, pb::EntryKind::Dir)
    };
    let link = pb::Entry {
        link_target: b"/etc".to_vec(),
        mode: 0o120777,
        ..entry(b"data", pb::EntryKind::Symlink)
    };
    let etc = pb::Entry {
        mode: 0o40755,
        ..entry(b"etc", pb::EntryKind::Dir)
    };
    gamma
        .apply_batch(batch(
            "gamma",
            root_fs,
            1,
            vec![etc, link, dir(b"", &[b"data", b"etc"])],
        ))
        .await?;
    gamma
        .apply_batch(batch("gamma", data_fs, 2, vec![dir(b"", &[])]))
        .await?;
    let before = bash("find /etc -xdev -type f -readable -print0 | sort -z | xargs -0 md5sum 2>/dev/null | md5sum")?;
    let mounts_before = std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some("/etc"))
        .count();
    let err = cloud.ferry_fails(&["systems", "customize", "gamma", "--target", "local"]);
    assert!(
        err.contains("/data") && err.contains("symlink"),
        "not refused by name: {err}"
    );
    let after = bash("find /etc -xdev -type f -readable -print0 | sort -z | xargs -0 md5sum 2>/dev/null | md5sum")?;
    assert_eq!(before, after, "the host's /etc changed");
    let mounts_after = std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some("/etc"))
        .count();
    assert_eq!(
        mounts_before, mounts_after,
        "something was mounted over /etc"
    );
    // The copies' loop devices are gone (the replicas' own stay, mounted).
    no_loop_device_under(&t.join("cloud/prepared"))?;
    Ok(())
}

/// Runs `ferry-site serve` with a token (20 s at most); whether it stayed up, and what it
/// said on stderr.
fn site_serve(
    dir: &std::path::Path,
    name: &str,
    upstream: &str,
    token: &str,
) -> Result<(bool, String)> {
    let out = std::process::Command::new("timeout")
        .arg("20")
        .arg(bin("ferry-site"))
        .args(["serve", "--name", name, "--listen"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--data-dir")
        .arg(dir)
        .arg("--upstream")
        .arg(upstream)
        .env("FERRY_TOKEN", token)
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// A join token enrolls only the role and name it was made for; a site relays only for
/// the systems bound to it; tokens are listed without their secrets and can be revoked.
#[tokio::test(flavor = "multi_thread")]
async fn tokens_enroll_only_their_scope_and_a_site_relays_only_for_its_systems() -> Result<()> {
    let tmp = scratch("scoped-tokens")?;
    let t = tmp.path();
    let cloud = CloudMgr::start(&t.join("cloud"))?;
    let victim_token = cloud.token_with(&["--system", "victim"])?;

    // A real site manager given an agent's token is refused, says why and stops.
    let (ok, said) = site_serve(&t.join("site"), "site1", &cloud.url(), &victim_token)?;
    assert!(!ok, "{said}");
    assert!(said.contains("enrolls an agent, not site:site1"), "{said}");
    // Nor does it enroll another system's name.
    let e = enrolled_client(&cloud.url(), &victim_token, "other", &t.join("other"))
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("enrolls agent:victim, not agent:other"), "{e}");

    // The refusals spent nothing: the system itself enrolls and writes its replica.
    let mut victim =
        enrolled_client(&cloud.url(), &victim_token, "victim", &t.join("victim")).await?;
    let fs = "0a1b2c3d-0000-4000-8000-00000000001a";
    victim.register(register("victim", fs)).await?;
    let dir = |name: &[u8]| pb::Entry {
        mode: 0o40755,
        ..entry(name, pb::EntryKind::Dir)
    };
    victim
        .apply_batch(batch("victim", fs, 1, vec![dir(b"kept")]))
        .await?;

    // A site with a token of its own, bound to nothing, cannot write it.
    let rogue_token = cloud.token_with(&["--role", "site", "--name", "rogue"])?;
    let mut rogue = enrolled_as(
        Role::Site,
        &cloud.url(),
        &rogue_token,
        "rogue",
        &t.join("rogue"),
    )
    .await?;
    let err = rogue
        .apply_batch(batch("victim", fs, 2, vec![dir(b"planted")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("ferry sites bind rogue victim"),
        "{err:?}"
    );
    let err = rogue
        .register(register("victim", "0a1b2c3d-0000-4000-8000-00000000001b"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let replica = cloud.replica_path("victim", "/")?;
    assert!(replica.join("kept").is_dir() && !replica.join("planted").exists());
    let shown = cloud.ferry_json(&["systems", "show", "victim"])?;
    assert_eq!(shown["durable_epoch"], 1, "{shown}");
    assert_eq!(shown["filesystems"].as_array().map(Vec::len), Some(1));

    // Tokens are listed with their scope, never their secret; a revoked one is spent.
    let spare = JoinToken::parse(&cloud.token_with(&["--system", "spare"])?)?;
    let list = cloud.ferry_json(&["token", "list"])?;
    assert!(!list.to_string().contains(spare.secret.expose()), "{list}");
    let state = |id: &str| {
        list.as_array()
            .and_then(|l| l.iter().find(|t| t["id"] == id))
            .map(|t| (t["state"].clone(), t["role"].clone(), t["name"].clone()))
    };
    assert_eq!(
        state(&spare.id),
        Some(("pending".into(), "agent".into(), "spare".into()))
    );
    let rogue_id = JoinToken::parse(&rogue_token)?.id;
    assert_eq!(
        state(&rogue_id),
        Some(("used".into(), "site".into(), "rogue".into()))
    );
    sh(std::process::Command::new(bin("ferry"))
        .arg("--credentials")
        .arg(cloud.creds())
        .args(["token", "revoke", &spare.id]))?;
    let e = enrolled_client(&cloud.url(), &spare.render(), "spare", &t.join("spare"))
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("unknown, already used or expired"), "{e}");

    // Bound by the operator, the site may relay for the system.
    sh(std::process::Command::new(bin("ferry"))
        .arg("--credentials")
        .arg(cloud.creds())
        .args(["sites", "bind", "rogue", "victim"]))?;
    rogue
        .apply_batch(batch("victim", fs, 2, vec![dir(b"kept"), dir(b"relayed")]))
        .await?;
    assert!(replica.join("relayed").is_dir());
    let sites = cloud.ferry_json(&["sites", "list"])?;
    assert_eq!(sites[0]["name"], "rogue", "{sites}");
    assert_eq!(sites[0]["systems"][0], "victim", "{sites}");
    Ok(())
}

/// A site's certificate cannot pose as the cloud manager: an agent that enrolled with
/// the cloud manager refuses a server presenting one, and a site will not send its
/// token to one.
#[tokio::test(flavor = "multi_thread")]
async fn a_site_certificate_cannot_pose_as_the_cloud_manager() -> Result<()> {
    let tmp = scratch("impostor")?;
    let t = tmp.path();
    let cloud = CloudMgr::start(&t.join("cloud"))?;
    let src = t.join("src");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("f"), b"one")?;
    // The agent enrolls with the cloud manager itself and replicates once.
    agent_once(
        &t.join("agent"),
        &cloud.url(),
        Some(&cloud.token()?),
        &src,
        "direct",
    )?;
    let epoch = cloud.ferry_json(&["systems", "show", "direct"])?["durable_epoch"].clone();
    // A real site manager, whose certificate is a site's, answers where it dials now.
    let site = SiteMgr::start(&t.join("site"), &cloud.url(), Some(&cloud.site_token()?))?;
    std::fs::write(src.join("f"), b"two")?;
    let out = std::process::Command::new("timeout")
        .arg("20")
        .arg(bin("ferry-agent"))
        .args(["run", "--once", "--name", "direct", "--state-dir"])
        .arg(t.join("agent"))
        .arg("--manager")
        .arg(site.url())
        .arg("--root")
        .arg(&src)
        .output()?;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("the server is site:site1, not a cloud manager"),
        "{said}"
    );
    let shown = cloud.ferry_json(&["systems", "show", "direct"])?;
    assert_eq!(shown["durable_epoch"], epoch, "{shown}");
    assert_eq!(
        std::fs::read(cloud.replica_path("direct", "/")?.join("f"))?,
        b"one"
    );

    // A second site pointed at the first as its upstream never sends its token.
    let token = cloud.token_with(&["--role", "site", "--name", "site2"])?;
    let (ok, said) = site_serve(&t.join("site2"), "site2", &site.url(), &token)?;
    assert!(!ok, "{said}");
    assert!(
        said.contains("the server is site:site1, not a cloud manager"),
        "{said}"
    );
    let id = JoinToken::parse(&token)?.id;
    let list = cloud.ferry_json(&["token", "list"])?;
    let state = list
        .as_array()
        .and_then(|l| l.iter().find(|t| t["id"] == id.as_str()))
        .map(|t| t["state"].clone());
    assert_eq!(state, Some("pending".into()), "{list}");
    Ok(())
}

/// The most the cloud manager's memory may grow while anonymous peers flood it.
const FLOOD_RSS_BOUND: u64 = 256 << 20;

fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb << 10)
}

/// Opens an anonymous HTTP/2 connection and starts a unary call to `path` whose one
/// message says it is `len` bytes, then sends those bytes; returns once the server has
/// answered (its status code) or the connection ended. The body is slices of one shared
/// buffer, so many of these cost the test little memory.
async fn anonymous_unary(port: u16, ca: &str, path: &str, len: usize) -> Option<String> {
    let cfg = ferry_common::tls::anonymous_client_config(ca).ok()?;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let name = rustls_pki_types_name();
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .ok()?;
    let (mut client, conn) = h2::client::handshake(tls).await.ok()?;
    tokio::spawn(conn);
    let req = http::Request::post(format!("https://127.0.0.1:{port}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .ok()?;
    let (resp, mut send) = client.send_request(req, false).ok()?;
    let mut head = vec![0u8];
    head.extend_from_slice(&(len as u32).to_be_bytes());
    send.send_data(bytes::Bytes::from(head), false).ok()?;
    static MIB: std::sync::OnceLock<bytes::Bytes> = std::sync::OnceLock::new();
    let mib = MIB.get_or_init(|| bytes::Bytes::from(vec![0x42u8; 1 << 20]));
    let sender = tokio::spawn(async move {
        for _ in 0..len >> 20 {
            if send.send_data(mib.clone(), false).is_err() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // The message stays open: a peer that never finishes its call.
        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
        drop(send);
    });
    let answer = tokio::time::timeout(std::time::Duration::from_secs(20), resp).await;
    sender.abort();
    match answer {
        Ok(Ok(r)) => Some(
            r.headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_string(),
        ),
        _ => None,
    }
}

fn rustls_pki_types_name() -> tokio_rustls::rustls::pki_types::ServerName<'static> {
    tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1").expect("a name")
}

/// Anonymous peers get nowhere but enrollment, and get there slowly: 500 of them opening
/// calls, among them sixty sending 16 MiB Ingest messages that never end, leave the
/// cloud manager's memory within a bound while an enrolled agent replicates; guessed
/// tokens are rate-limited.
#[tokio::test(flavor = "multi_thread")]
async fn anonymous_floods_stay_bounded_and_enrolled_agents_go_on() -> Result<()> {
    let tmp = scratch("anon-flood")?;
    let t = tmp.path();
    let cloud = CloudMgr::start(&t.join("cloud"))?;
    let pid = cloud.proc.child.id();
    let src = t.join("src");
    bash(&format!(
        "mkdir -p {m}/d && for i in $(seq 1 200); do head -c 20000 /dev/urandom > {m}/d/f$i; done",
        m = src.display()
    ))?;
    let ca = ca_pem(&cloud)?;
    // Enrolled and in sync before the flood.
    agent_once(
        &t.join("agent"),
        &cloud.url(),
        Some(&cloud.token()?),
        &src,
        "steady",
    )?;
    let before = rss(pid);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = |s: &std::sync::atomic::AtomicBool| s.load(std::sync::atomic::Ordering::Relaxed);
    let admitted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut flood = Vec::new();
    for i in 0..500 {
        let (port, ca, stop) = (cloud.port, ca.clone(), stop.clone());
        let (admitted, refused) = (admitted.clone(), refused.clone());
        flood.push(tokio::spawn(async move {
            let (path, len) = if i % 8 == 0 {
                ("/ferry.v1.Ingest/ApplyBatch", 16 << 20)
            } else {
                ("/ferry.v1.Ingest/Register", 1 << 20)
            };
            while !stopped(&stop) {
                match anonymous_unary(port, &ca, path, len).await.as_deref() {
                    Some("0") => admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                    _ => refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                };
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }));
    }
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            while !stopped(&stop) {
                peak.fetch_max(rss(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        })
    };
    // Let the flood build, then replicate through it.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let (work, url, token) = (t.join("agent"), cloud.url(), cloud.token()?);
    let src2 = src.clone();
    let replicated =
        tokio::task::spawn_blocking(move || agent_once(&work, &url, Some(&token), &src2, "steady"))
            .await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for f in flood {
        f.await?;
    }
    sampler.await?;
    replicated?;
    let diff = rsync_diff(&src, &cloud.replica_path("steady", "/")?)?;
    assert!(diff.is_empty(), "{diff}");
    let (admitted, refused) = (
        admitted.load(std::sync::atomic::Ordering::Relaxed),
        refused.load(std::sync::atomic::Ordering::Relaxed),
    );
    assert_eq!(admitted, 0, "an anonymous call got through");
    assert!(refused >= 500, "{refused} refusals");
    let grew = peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(before);
    eprintln!(
        "cloud manager rss: {before} before, grew {grew} under the flood; {refused} refusals"
    );
    assert!(grew < FLOOD_RSS_BOUND, "rss grew {grew} bytes");

    // Guessed tokens: past a burst, enrollments are refused for a while.
    let mut limited = 0;
    for i in 0..40 {
        let guess = format!(
            "ferry1.{:08x}.{}.{}",
            i,
            "0".repeat(32),
            JoinToken::parse(&cloud.token()?)?.ca_fingerprint
        );
        let e = enrolled_client(
            &cloud.url(),
            &guess,
            &format!("g{i}"),
            &t.join(format!("g{i}")),
        )
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        if e.contains("too many enrollments") {
            limited += 1;
        }
    }
    assert!(limited > 0, "no enrollment was rate-limited");
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    enrolled_client(&cloud.url(), &cloud.token()?, "late", &t.join("late")).await?;
    Ok(())
}
