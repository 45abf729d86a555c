//! End-to-end replication through a site manager into real volumes, cross-system chunk
//! dedup, the site streaming uploads through to a cloud that answers and spooling them
//! while it is away, and the site writing spooled chunks through, with the real daemons.
use anyhow::Result;
use ferry_proto::v1 as pb;
use ferry_tests::*;
use std::time::Duration;

#[test]
fn three_systems_replicate_byte_identical_through_a_site() -> Result<()> {
    let tmp = scratch("e2e")?;
    let t = tmp.path();
    let systems = [
        ("web01", "ext4", "0a1b2c3d-0000-4000-8000-000000000001"),
        ("app01", "xfs", "0a1b2c3d-0000-4000-8000-000000000002"),
        ("db01", "ext3", "0a1b2c3d-0000-4000-8000-000000000003"),
    ];
    let mut sources = Vec::new();
    for (i, (name, fstype, uuid)) in systems.iter().enumerate() {
        let fs = LoopFs::new(t, name, fstype, uuid, 400)?;
        populate(&fs.mnt, i as u32)?;
        sources.push(fs);
    }
    let cloud = CloudMgr::start(&t.join("cloud"))?;
    let site = SiteMgr::start(&t.join("site"), &cloud.url(), Some(&cloud.site_token()?))?;
    let mut inline = 0;
    for ((name, _, _), fs) in systems.iter().zip(&sources) {
        let summary = agent_once(
            &t.join(format!("agent-{name}")),
            &site.url(),
            Some(&cloud.token()?),
            &fs.mnt,
            name,
        )?;
        assert!(
            summary["durable_epoch"].as_u64().unwrap_or(0) >= 1,
            "{summary}"
        );
        inline += summary["inline_files_this_run"].as_u64().unwrap_or(0);
    }
    // The small files (200 pages a system, the empty and tiny ones) went with their
    // contents inline: the cloud said it takes them and the site passed that on (by the
    // second system at the latest, should the first registration find upstream slow).
    assert!(inline >= 400, "{inline} files went inline");
    // Status shows every system in sync with a durable epoch time.
    let status = cloud.ferry_json(&["sync", "status"])?;
    let listed = status["systems"].as_array().cloned().unwrap_or_default();
    assert_eq!(listed.len(), 3, "{status}");
    for s in &listed {
        assert_eq!(s["state"], "in-sync", "{s}");
        assert!(s["last_durable_unix_ms"].as_i64().unwrap_or(0) > 0, "{s}");
        assert_eq!(s["via"], "site:site1", "{s}");
    }
    let show = cloud.ferry_json(&["systems", "show", "app01"])?;
    assert_eq!(show["filesystems"][0]["fstype"], "xfs");
    // The probed configuration is kept with the system.
    assert_eq!(show["probe"]["os"]["id"], "debian", "{show}");
    assert_eq!(show["probe"]["hostname"], "host-1", "{show}");
    let mut images = Vec::new();
    for ((name, fstype, uuid), fs) in systems.iter().zip(&sources) {
        let replica = cloud.replica_path(name, "/")?;
        let diff = rsync_diff(&fs.mnt, &replica)?;
        assert!(diff.is_empty(), "{name} differs:\n{diff}");
        // The sparse file stays sparse.
        let used = std::fs::metadata(replica.join("var/log/sparse.db"))
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m))?;
        assert!(used * 512 < 4 << 20, "sparse file filled in: {used} blocks");
        // An ext4 replica is mounted so a rename over a file does not start its
        // writeback (each batch ends with one syncfs instead).
        let mounted = std::fs::read_to_string("/proc/self/mountinfo")?
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(replica.to_str().unwrap_or_default()))
            .map(str::to_string)
            .unwrap_or_default();
        assert_eq!(
            mounted.contains("noauto_da_alloc"),
            *fstype == "ext4",
            "{name}: {mounted}"
        );
        let image = cloud
            .dir
            .join("volumes")
            .join(name)
            .join(format!("{uuid}.img"));
        images.push((image, fstype.to_string(), uuid.to_string()));
    }
    let mut cloud = cloud;
    cloud.proc.stop()?;
    for (image, fstype, uuid) in &images {
        let (t, u) = blkid(image)?;
        assert_eq!((&t, &u), (fstype, uuid), "{}", image.display());
        fsck(image, fstype)?;
    }
    Ok(())
}

#[test]
fn identical_data_on_two_systems_crosses_the_wire_once() -> Result<()> {
    let tmp = scratch("dedup")?;
    let t = tmp.path();
    let a = LoopFs::new(t, "a", "ext4", "0a1b2c3d-0000-4000-8000-0000000000aa", 600)?;
    let b = LoopFs::new(t, "b", "ext4", "0a1b2c3d-0000-4000-8000-0000000000bb", 600)?;
    bash(&format!(
        "mkdir -p {a}/opt && for i in $(seq 1 20); do head -c 10485760 /dev/urandom > {a}/opt/blob$i; done && cp -a {a}/opt {b}/",
        a = a.mnt.display(),
        b = b.mnt.display()
    ))?;
    let data: u64 = 200 << 20;
    let cloud = CloudMgr::start(&t.join("cloud"))?;
    let site = SiteMgr::start(&t.join("site"), &cloud.url(), Some(&cloud.site_token()?))?;
    let sa = agent_once(
        &t.join("agent-a"),
        &site.url(),
        Some(&cloud.token()?),
        &a.mnt,
        "sys-a",
    )?;
    let raw_after_a = cloud.counter("chunk_raw_bytes")?;
    let sb = agent_once(
        &t.join("agent-b"),
        &site.url(),
        Some(&cloud.token()?),
        &b.mnt,
        "sys-b",
    )?;
    let raw_after_b = cloud.counter("chunk_raw_bytes")?;
    let wire_b = sb["chunk_wire_bytes_this_run"].as_u64().unwrap_or(u64::MAX);
    assert!(
        raw_after_a >= data,
        "first system's data arrived: {raw_after_a}"
    );
    assert!(
        raw_after_b - raw_after_a < data / 100,
        "second system resent its data: {} bytes",
        raw_after_b - raw_after_a
    );
    assert!(
        wire_b < data / 100,
        "second agent sent {wire_b} bytes: {sb}"
    );
    assert!(
        sa["chunk_wire_bytes_this_run"].as_u64().unwrap_or(0) >= data,
        "{sa}"
    );
    for (fs, name) in [(&a, "sys-a"), (&b, "sys-b")] {
        let diff = rsync_diff(&fs.mnt, &cloud.replica_path(name, "/")?)?;
        assert!(diff.is_empty(), "{name} differs:\n{diff}");
    }
    Ok(())
}

/// Which of `hashes` the manager behind `c` says it lacks.
async fn lacks(
    c: &mut pb::ingest_client::IngestClient<tonic::transport::Channel>,
    hashes: &[Vec<u8>],
    durable: bool,
) -> Result<Vec<u32>> {
    let req = pb::MissingChunksRequest {
        hashes: hashes.to_vec(),
        asker_keeps_copy: !durable,
    };
    Ok(c.missing_chunks(req).await?.into_inner().missing)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_writes_chunks_through_before_their_batch_and_the_cloud_keeps_what_it_promised(
) -> Result<()> {
    let tmp = scratch("write-through")?;
    let t = tmp.path();
    let mut cloud = CloudMgr::start(&t.join("cloud"))?;
    // Spooling every upload: the write-through is what takes them to the cloud.
    let site = SiteMgr::start_with(
        &t.join("site"),
        free_port(),
        &cloud.url(),
        Some(&cloud.site_token()?),
        &["--spool-always"],
    )?;
    let mut agent =
        enrolled_client(&site.url(), &cloud.token()?, "alpha", &t.join("alpha")).await?;
    agent
        .register(register("alpha", "0a1b2c3d-0000-4000-8000-0000000000a1"))
        .await?;
    let frames = random_frames(3);
    let hashes = hashes_of(&frames);
    let cloud_id = t.join("probe");
    let mut probe = enrolled_client(&cloud.url(), &cloud.token()?, "probe", &cloud_id).await?;
    assert_eq!(lacks(&mut probe, &hashes, false).await?, [0, 1, 2]);

    // Uploaded to the site, and no batch refers to them yet: the cloud gets them anyway.
    agent.put_chunks(tokio_stream::iter(frames)).await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !lacks(&mut probe, &hashes, false).await?.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the site did not write the chunks through within 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // Promised to a peer that keeps no copy: the chunks outlive a SIGKILL of the cloud.
    assert!(lacks(&mut probe, &hashes, true).await?.is_empty());
    cloud.restart()?;
    let mut probe = enrolled_client(&cloud.url(), &cloud.token()?, "probe", &cloud_id).await?;
    assert!(lacks(&mut probe, &hashes, false).await?.is_empty());
    Ok(())
}

/// `n` frames of random raw chunks of 64 KiB.
fn random_frames(n: usize) -> Vec<pb::ChunkFrame> {
    (0..n)
        .map(|_| {
            let data: Vec<u8> = (0..65536).map(|_| rand::random::<u8>()).collect();
            pb::ChunkFrame {
                hash: blake3::hash(&data).as_bytes().to_vec(),
                raw_len: data.len() as u32,
                zdata: data.into(),
                raw: true,
            }
        })
        .collect()
}

fn hashes_of(frames: &[pb::ChunkFrame]) -> Vec<Vec<u8>> {
    frames.iter().map(|f| f.hash.clone()).collect()
}

/// One series of the site's metrics.
fn site_series(port: u16, name: &str) -> Result<f64> {
    let m = metrics_at(port)?;
    series(&m, name).ok_or_else(|| anyhow::anyhow!("no {name} in\n{m}"))
}

/// While the cloud answers, uploads stream through the site: the cloud holds them at
/// once and the site spools nothing. A chunk whose content is not its name, and a frame
/// of impossible shape, are refused, and neither stops the streaming. With the cloud
/// away, an upload is refused as unavailable and the next is spooled; once the cloud is
/// back and the hold is over, uploads stream through again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_streams_uploads_through_to_a_cloud_that_answers_and_spools_while_it_is_away(
) -> Result<()> {
    let tmp = scratch("pass-through")?;
    let t = tmp.path();
    let mut cloud = CloudMgr::start(&t.join("cloud"))?;
    let http = free_port();
    let site = SiteMgr::start_with(
        &t.join("site"),
        free_port(),
        &cloud.url(),
        Some(&cloud.site_token()?),
        &["--http", &format!("127.0.0.1:{http}")],
    )?;
    let mut agent =
        enrolled_client(&site.url(), &cloud.token()?, "alpha", &t.join("alpha")).await?;
    agent
        .register(register("alpha", "0a1b2c3d-0000-4000-8000-0000000000a2"))
        .await?;
    let cloud_id = t.join("probe");
    let mut probe = enrolled_client(&cloud.url(), &cloud.token()?, "probe", &cloud_id).await?;
    let passing = || site_series(http, "ferry_site_passing_through").unwrap_or(0.0) == 1.0;
    wait_for(
        "the site to stream uploads through",
        Duration::from_secs(30),
        passing,
    )?;

    // Held by the cloud as soon as the upload returns; nothing spooled at the site.
    let frames = random_frames(3);
    let hashes = hashes_of(&frames);
    agent.put_chunks(tokio_stream::iter(frames)).await?;
    assert!(lacks(&mut probe, &hashes, false).await?.is_empty());
    assert_eq!(site_series(http, "ferry_site_spool_chunks")?, 0.0);
    let passed = site_series(http, "ferry_site_chunk_bytes_passed_through_total")?;
    assert!(passed >= (3 * 65536) as f64, "{passed}");

    // Content that is not its name: refused by the cloud, and said so to the agent.
    let mut bad = random_frames(2);
    let mut z = bad[1].zdata.to_vec();
    z[0] ^= 1;
    bad[1].zdata = z.into();
    let bad_hashes = hashes_of(&bad);
    let e = agent
        .put_chunks(tokio_stream::iter(bad))
        .await
        .expect_err("a chunk that is not its name was taken");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("refused a chunk"), "{e}");
    // A frame that cannot be a chunk: refused by the site, unopened.
    let mut odd = random_frames(1);
    odd[0].raw_len = 1000;
    let e = agent
        .put_chunks(tokio_stream::iter(odd))
        .await
        .expect_err("a frame of impossible shape was taken");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(lacks(&mut probe, &bad_hashes, false).await?.contains(&1));
    assert!(
        passing(),
        "a hostile upload stopped the streaming for everyone"
    );

    // The cloud away: the upload is refused as unavailable, the next one spooled.
    cloud.proc.kill9();
    let frames = random_frames(2);
    let away = hashes_of(&frames);
    let e = agent
        .put_chunks(tokio_stream::iter(frames.clone()))
        .await
        .expect_err("an upload streamed into a cloud that is away was taken");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    agent.put_chunks(tokio_stream::iter(frames)).await?;
    assert!(site_series(http, "ferry_site_spool_chunks")? >= 2.0);
    // Held at the site, as the agent's next question hears while the cloud is away.
    assert!(lacks(&mut agent, &away, false).await?.is_empty());
    assert_eq!(site_series(http, "ferry_site_passing_through")?, 0.0);

    // Back: after the hold, uploads stream through again.
    cloud.restart()?;
    let mut probe = enrolled_client(&cloud.url(), &cloud.token()?, "probe", &cloud_id).await?;
    // The site hears of it at its next talk upstream (every 15 s) or chunk question.
    wait_for(
        "the site to stream through again",
        Duration::from_secs(90),
        passing,
    )?;
    let before = site_series(http, "ferry_site_chunk_bytes_passed_through_total")?;
    let frames = random_frames(2);
    let hashes = hashes_of(&frames);
    agent.put_chunks(tokio_stream::iter(frames)).await?;
    assert!(lacks(&mut probe, &hashes, false).await?.is_empty());
    let after = site_series(http, "ferry_site_chunk_bytes_passed_through_total")?;
    assert!(after >= before + (2 * 65536) as f64, "{before} -> {after}");
    Ok(())
}

/// A file with more chunk references than one message holds (over 12 GiB for real; the
/// limit is lowered for the test) crosses agent, site and cloud in parts, each in a
/// batch of its own, and lands byte-identical and sparse where its source is; a later
/// change to it goes the same way; nothing of the assembly is left behind.
#[test]
fn a_file_too_large_for_one_message_replicates_in_parts() -> Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let tmp = scratch("parts")?;
    let t = tmp.path();
    let src = LoopFs::new(
        t,
        "src",
        "ext4",
        "0a1b2c3d-0000-4000-8000-0000000b1a55",
        400,
    )?;
    let big = src.mnt.join("var/lib/big.img");
    std::fs::create_dir_all(big.parent().unwrap_or(&src.mnt))?;
    let mut data = vec![0u8; 24 << 20];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut data);
    let mut f = std::fs::File::create(&big)?;
    f.write_all(&data)?;
    // A hole, then more data: 2 GiB apparent, 40 MiB real.
    f.seek(SeekFrom::Start(2 << 30))?;
    f.write_all(&data[..16 << 20])?;
    drop(f);
    std::fs::write(src.mnt.join("small"), b"small")?;
    let cloud = CloudMgr::start(&t.join("cloud"))?;
    let site = SiteMgr::start(&t.join("site"), &cloud.url(), Some(&cloud.site_token()?))?;
    let run = |token: Option<&str>| -> Result<()> {
        let mut cmd = agent_cmd(&t.join("agent"), &site.url(), token, &src.mnt, "big");
        let out = output(cmd.env("FERRY_TEST_MAX_REFS", "64"))?;
        anyhow::ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    run(Some(&cloud.token()?))?;
    let batches = cloud.counter("batches_applied")?;
    assert!(
        batches >= 6,
        "{batches} batches: the file did not go in parts"
    );
    let replica = cloud.replica_path("big", "/")?;
    let diff = rsync_diff(&src.mnt, &replica)?;
    assert!(diff.is_empty(), "differs:\n{diff}");
    let copy = replica.join("var/lib/big.img");
    let used = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&copy)?) * 512;
    assert!(used < 64 << 20, "the hole was filled in: {used} bytes used");

    // Changed in the middle, it goes again in parts and matches.
    let mut f = std::fs::OpenOptions::new().write(true).open(&big)?;
    f.seek(SeekFrom::Start(8 << 20))?;
    f.write_all(&data[..1 << 20])?;
    drop(f);
    run(None)?;
    let diff = rsync_diff(&src.mnt, &replica)?;
    assert!(diff.is_empty(), "differs after a change:\n{diff}");
    let left = bash(&format!(
        "find '{}' -name '.ferry-part-*'",
        replica.display()
    ))?;
    assert!(left.trim().is_empty(), "assembly left behind: {left}");
    Ok(())
}

/// Chunks are compressed once, on the link that needs it: an agent sends them to its site
/// as read (no CPU spent on the source host), the site compresses them for the cloud
/// (unless told its upstream link is fast), and an agent that reaches the cloud directly
/// compresses them itself. Every replica matches its source.
#[test]
fn chunks_are_compressed_once_on_the_link_beyond_the_site() -> Result<()> {
    let tmp = scratch("compress")?;
    let t = tmp.path();
    const TEXT: u64 = 6 << 20;
    // Four sources, each with its own text (numbered lines: compressible, yet no two
    // chunks alike) and a random file.
    let mut sources = Vec::new();
    for (i, name) in ["via-site", "via-fast-site", "direct", "via-spool"]
        .iter()
        .enumerate()
    {
        let uuid = format!("0a1b2c3d-0000-4000-8000-00000000c0{i:02}");
        let fs = LoopFs::new(t, name, "ext4", &uuid, 100)?;
        bash(&format!(
            "cd '{m}' && mkdir -p var/log && seq -f 'line %.0f of {name}: the same words again' 1 400000 | head -c {TEXT} > var/log/app.log \
             && head -c 1000000 /dev/urandom > var/log/noise.bin",
            m = fs.mnt.display()
        ))?;
        sources.push((*name, fs));
    }
    let cloud = CloudMgr::start(&t.join("cloud"))?;
    let site = SiteMgr::start(&t.join("site"), &cloud.url(), Some(&cloud.site_token()?))?;
    let fast = SiteMgr::start_with(
        &t.join("site-fast"),
        free_port(),
        &cloud.url(),
        Some(&cloud.token_with(&["--role", "site", "--name", "site-fast"])?),
        &["--upstream-compression", "none", "--name", "site-fast"],
    )?;
    let spooling = SiteMgr::start_with(
        &t.join("site-spool"),
        free_port(),
        &cloud.url(),
        Some(&cloud.token_with(&["--role", "site", "--name", "site-spool"])?),
        &["--spool-always", "--name", "site-spool"],
    )?;
    // (agent's bytes on the wire, bytes that reached the cloud) per system.
    let mut seen = Vec::new();
    let managers = [site.url(), fast.url(), cloud.url(), spooling.url()];
    for ((name, fs), manager) in sources.iter().zip(managers) {
        let before = cloud.counter("chunk_wire_bytes")?;
        let summary = agent_once(
            &t.join(format!("agent-{name}")),
            &manager,
            Some(&cloud.token()?),
            &fs.mnt,
            name,
        )?;
        let sent = summary["chunk_wire_bytes_this_run"].as_u64().unwrap_or(0);
        // `--once` returns once its batches are durable at the cloud, chunks and all.
        let diff = rsync_diff(&fs.mnt, &cloud.replica_path(name, "/")?)?;
        assert!(diff.is_empty(), "{name} differs:\n{diff}");
        let arrived = cloud.counter("chunk_wire_bytes")?.saturating_sub(before);
        seen.push((sent, arrived));
    }
    let [(a_sent, a_cloud), (b_sent, b_cloud), (c_sent, c_cloud), (d_sent, d_cloud)] = seen[..]
    else {
        anyhow::bail!("{seen:?}")
    };
    // Through the site: the agent sent the text as it is, the site compressed it.
    assert!(
        a_sent >= TEXT + 1_000_000,
        "agent compressed for a site: {a_sent}"
    );
    assert!(
        (1_000_000..2_500_000).contains(&a_cloud),
        "site did not compress: {a_cloud} bytes reached the cloud"
    );
    // Through a site whose upstream is fast: as the agent sent it, all the way.
    assert!(
        b_sent >= TEXT + 1_000_000,
        "agent compressed for a site: {b_sent}"
    );
    assert!(b_cloud >= TEXT + 1_000_000, "site compressed: {b_cloud}");
    // Straight to the cloud: the agent compressed it.
    assert!(
        (1_000_000..2_500_000).contains(&c_sent),
        "agent sent {c_sent} bytes straight to the cloud"
    );
    assert!((1_000_000..2_500_000).contains(&c_cloud), "{c_cloud}");
    // Through a site that spools every upload: compressed into the spool, sent on so.
    assert!(
        d_sent >= TEXT + 1_000_000,
        "agent compressed for a site: {d_sent}"
    );
    assert!(
        (1_000_000..2_500_000).contains(&d_cloud),
        "spooled chunks went up uncompressed: {d_cloud}"
    );
    Ok(())
}
