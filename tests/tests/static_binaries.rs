//! The static builds of the agent and the tunnel (`x86_64-unknown-linux-musl`, made by
//! `.ci/run`): they link nothing at run time, do their real work (the agent replicates
//! and follows a change; the three tunnel roles carry TCP and UDP end to end), and every
//! system call they make there, recorded with `strace -f -c`, is looked up in
//! `syscalls` for the oldest kernel they run on, which must not exceed the one the docs
//! state.
use anyhow::{ensure, Context, Result};
use ferry_tests::syscalls::{from_strace_summary, oldest_kernel};
use ferry_tests::*;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The oldest kernel ARCHITECTURE.md states for the static agent and tunnel.
const STATED: &str = "2.6.28";

/// `program ARGS` under `strace -f -c`, its summary in `out`.
fn traced(out: &Path, program: &Path) -> Command {
    let mut c = Command::new("strace");
    c.args(["-f", "-c", "-o"]).arg(out).arg(program);
    c
}

/// SIGTERM to the traced program (strace's child), so strace writes its summary.
fn stop_traced(p: &mut Proc) -> Result<()> {
    let children = sh(Command::new("pgrep").args(["-P", &p.child.id().to_string()]))?;
    for pid in children.split_whitespace() {
        sh(Command::new("kill").args(["-TERM", pid]))?;
    }
    wait_for("strace's summary", Duration::from_secs(20), || {
        matches!(p.child.try_wait(), Ok(Some(_)))
    })
}

fn calls(summary: &Path) -> Result<BTreeSet<String>> {
    let text = std::fs::read_to_string(summary)?;
    let calls = from_strace_summary(&text);
    ensure!(
        calls.len() > 10,
        "no summary in {}: {text}",
        summary.display()
    );
    Ok(calls)
}

fn is_static(path: &Path) -> Result<()> {
    let headers = sh(Command::new("readelf").arg("-lW").arg(path))?;
    ensure!(
        !headers.contains("INTERP"),
        "{} asks for a dynamic loader",
        path.display()
    );
    let dynamic = sh(Command::new("readelf").arg("-dW").arg(path))?;
    ensure!(
        !dynamic.contains("(NEEDED)"),
        "{} needs shared libraries: {dynamic}",
        path.display()
    );
    Ok(())
}

fn within_stated(what: &str, calls: &BTreeSet<String>) -> Result<String> {
    let (needs, call) = oldest_kernel(calls)?;
    let v = |s: &str| -> Vec<u32> { s.split('.').filter_map(|p| p.parse().ok()).collect() };
    ensure!(
        v(&needs) <= v(STATED),
        "{what} calls {call}, which needs Linux {needs}: newer than the stated {STATED}"
    );
    println!(
        "{what}: {} system calls, newest without a fallback: {call} (Linux {needs})",
        calls.len()
    );
    Ok(needs)
}

#[test]
fn the_static_agent_replicates_and_needs_no_newer_kernel_than_stated() -> Result<()> {
    let agent = static_bin("ferry-agent")?;
    is_static(&agent)?;
    let tmp = scratch("static-agent")?;
    let t = tmp.path();
    let cloud = CloudMgr::start(&t.join("cloud"))?;
    let src = LoopFs::new(
        t,
        "src",
        "ext4",
        "6a7b8c9d-0e1f-4a2b-8c3d-4e5f6a7b8c9d",
        128,
    )?;
    populate(&src.mnt, 11)?;
    std::fs::create_dir_all(src.mnt.join("etc"))?;
    std::fs::write(src.mnt.join("etc/hostname"), "static01\n")?;
    let summary = t.join("agent.strace");
    let mut cmd = traced(&summary, &agent);
    cmd.args(["run", "--state-dir"])
        .arg(t.join("state"))
        .args(["--manager", &cloud.url(), "--root"])
        .arg(&src.mnt)
        .args(["--name", "static01"])
        .env("FERRY_TOKEN", cloud.token()?);
    let mut p = Proc::spawn(&mut cmd, &t.join("agent.log"))?;
    let replica = cloud.wait_in_sync("static01", &src.mnt)?;
    // A change after the first pass goes through the watcher.
    std::fs::write(src.mnt.join("changed-later"), b"after the first pass\n")?;
    converged_within(&src.mnt, &replica, Duration::from_secs(30))?;
    stop_traced(&mut p)?;
    let calls = calls(&summary)?;
    ensure!(
        calls.contains("inotify_add_watch")
            && (calls.contains("epoll_wait") || calls.contains("epoll_pwait")),
        "{calls:?}"
    );
    within_stated("ferry-agent", &calls)?;
    Ok(())
}

#[test]
fn the_static_tunnel_carries_tcp_and_udp_and_needs_no_newer_kernel_than_stated() -> Result<()> {
    let tunnel = static_bin("ferry-tunnel")?;
    is_static(&tunnel)?;
    let tmp = scratch("static-tunnel")?;
    let d = tmp.path();
    // Everything on loopback: an echo service and a DNS server stay "in the enterprise".
    let (echo, dns, app, gw, proxy_tcp, proxy_udp) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let _echo = Proc::spawn(
        Command::new("python3").args([
            "-c",
            &format!(
                "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
                 s.bind(('127.0.0.1',{echo}))\ns.listen(8)\n\
                 while True:\n    c,_=s.accept()\n    c.sendall(c.recv(100))\n    c.close()\n"
            ),
        ]),
        &d.join("echo.log"),
    )?;
    let _dns = enterprise_dns(Command::new("dnsmasq"), d, dns)?;
    let keys: serde_json::Value = serde_json::from_str(&sh(Command::new(&tunnel)
        .args(["keys", "--out"])
        .arg(d.join("keys")))?)?;
    let pin = keys["host_key_fingerprint"]
        .as_str()
        .context("fingerprint")?
        .to_string();
    let k = d.join("keys");
    let table = d.join("table-b.ini");
    std::fs::write(
        &table,
        format!(
            "[ssh_tunnel]\nlisten_ip=127.0.0.1\nlisten_port={app}\n\
             host_key_file={k}/host_key\nauthorized_keys_file={k}/authorized_keys\n\
             keepalive_secs=2\n\
             [service_echo]\nname=echo\nprotocol=TCP\nreal_server_ip=127.0.0.1\n\
             real_server_port={echo}\nproxy_server_ip=127.0.0.1\nproxy_server_port={proxy_tcp}\n\
             [service_dns]\nname=dns\nprotocol=UDP\nreal_server_ip=127.0.0.1\n\
             real_server_port={dns}\nproxy_server_ip=127.0.0.1\nproxy_server_port={proxy_udp}\n",
            k = k.display()
        ),
    )?;
    let gateway = d.join("gateway.ini");
    std::fs::write(
        &gateway,
        format!("[gateway]\nlisten_ip=127.0.0.1\nlisten_port={gw}\napp_servers=127.0.0.1:{app}\n"),
    )?;
    let table_a = d.join("table-a.ini");
    std::fs::write(
        &table_a,
        format!(
            "remote_ssh_ip=127.0.0.1\nremote_ssh_port={gw}\n\
             forward_tunnel_remote_destination_ip=127.0.0.1\n\
             forward_tunnel_remote_destination_port={app}\n\
             is_first_establish_forward_tunnel=True\n\
             ssh_key_file={k}/client_key\nhost_key={pin}\nservice_table={t}\n\
             keepalive_secs=2\nconnect_timeout_secs=3\n\
             allow=127.0.0.1:{echo},127.0.0.1:{dns}/udp\n",
            k = k.display(),
            t = table.display()
        ),
    )?;
    let mut roles = Vec::new();
    for (role, conf) in [
        ("app", &table),
        ("gateway", &gateway),
        ("enterprise", &table_a),
    ] {
        let summary = d.join(format!("{role}.strace"));
        let mut cmd = traced(&summary, &tunnel);
        cmd.args([role, "--config"]).arg(conf);
        roles.push((
            role,
            summary,
            Proc::spawn(&mut cmd, &d.join(format!("{role}.log")))?,
        ));
    }
    // TCP: the echo service answers through enterprise → gateway → app.
    let mut echoed = String::new();
    wait_for("echo through the tunnel", Duration::from_secs(30), || {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", proxy_tcp)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
        echoed.clear();
        s.write_all(b"through ferry")
            .and_then(|_| s.read_to_string(&mut echoed))
            .is_ok()
            && echoed == "through ferry"
    })?;
    // UDP: dig at the proxy port resolves from the DNS server behind.
    let answer = sh(Command::new("dig").args([
        "@127.0.0.1",
        "-p",
        &proxy_udp.to_string(),
        "ldap.corp.example",
        "+short",
        "+time=3",
        "+tries=2",
    ]))?;
    ensure!(answer.trim() == "198.18.60.7", "dig said {answer:?}");
    for (role, summary, p) in &mut roles {
        stop_traced(p)?;
        let calls = calls(summary)?;
        within_stated(&format!("ferry-tunnel {role}"), &calls)?;
    }
    Ok(())
}
