//! The Linux version (x86_64) that introduced each system call the static binaries make,
//! for the oldest-kernel claim: `strace -f -c` summaries are read and every call is
//! looked up here. A call missing from the table fails the check, so the table grows
//! with what the binaries use and never guesses.
use anyhow::{bail, Result};
use std::collections::BTreeSet;

/// (name as strace prints it, kernel version that added it on x86_64). x86_64 entered
/// the kernel in 2.4, and its older calls are listed as "2.4".
const INTRODUCED: &[(&str, &str)] = &[
    ("accept", "2.4"),
    ("accept4", "2.6.28"),
    ("access", "2.4"),
    ("arch_prctl", "2.4"),
    ("bind", "2.4"),
    ("brk", "2.4"),
    ("capget", "2.4"),
    ("chdir", "2.4"),
    ("chmod", "2.4"),
    ("chown", "2.4"),
    ("clock_gettime", "2.6.0"),
    ("clock_nanosleep", "2.6.0"),
    ("clone", "2.4"),
    ("clone3", "5.3"),
    ("close", "2.4"),
    ("close_range", "5.9"),
    ("connect", "2.4"),
    ("copy_file_range", "4.5"),
    ("dup", "2.4"),
    ("dup2", "2.4"),
    ("dup3", "2.6.27"),
    ("epoll_create", "2.6.0"),
    ("epoll_create1", "2.6.27"),
    ("epoll_ctl", "2.6.0"),
    ("epoll_pwait", "2.6.19"),
    ("epoll_wait", "2.6.0"),
    ("eventfd", "2.6.22"),
    ("eventfd2", "2.6.27"),
    ("execve", "2.4"),
    ("exit", "2.4"),
    ("exit_group", "2.6.0"),
    ("faccessat", "2.6.16"),
    ("fadvise64", "2.6.0"),
    ("fallocate", "2.6.23"),
    ("fanotify_init", "2.6.37"),
    ("fanotify_mark", "2.6.37"),
    ("fchdir", "2.4"),
    ("fchmod", "2.4"),
    ("fchmodat", "2.6.16"),
    ("fchown", "2.4"),
    ("fchownat", "2.6.16"),
    ("fcntl", "2.4"),
    ("fdatasync", "2.4"),
    ("fgetxattr", "2.4"),
    ("flistxattr", "2.4"),
    ("flock", "2.4"),
    ("fork", "2.4"),
    ("fstat", "2.4"),
    ("fstatfs", "2.4"),
    ("fsync", "2.4"),
    ("ftruncate", "2.4"),
    ("futex", "2.6.0"),
    ("getcwd", "2.4"),
    ("getdents64", "2.4"),
    ("getegid", "2.4"),
    ("geteuid", "2.4"),
    ("getgid", "2.4"),
    ("getpeername", "2.4"),
    ("getpid", "2.4"),
    ("getppid", "2.4"),
    ("getrandom", "3.17"),
    ("getrlimit", "2.4"),
    ("getsockname", "2.4"),
    ("getsockopt", "2.4"),
    ("gettid", "2.4"),
    ("getuid", "2.4"),
    ("getxattr", "2.4"),
    ("inotify_add_watch", "2.6.13"),
    ("inotify_init", "2.6.13"),
    ("inotify_init1", "2.6.27"),
    ("inotify_rm_watch", "2.6.13"),
    ("ioctl", "2.4"),
    ("ioprio_set", "2.6.13"),
    ("kill", "2.4"),
    ("lgetxattr", "2.4"),
    ("linkat", "2.6.16"),
    ("listen", "2.4"),
    ("llistxattr", "2.4"),
    ("lseek", "2.4"),
    ("lstat", "2.4"),
    ("madvise", "2.4"),
    ("membarrier", "4.3"),
    ("mkdir", "2.4"),
    ("mkdirat", "2.6.16"),
    ("mlock", "2.4"),
    ("mmap", "2.4"),
    ("mprotect", "2.4"),
    ("mremap", "2.4"),
    ("munlock", "2.4"),
    ("munmap", "2.4"),
    ("nanosleep", "2.4"),
    ("newfstatat", "2.6.16"),
    ("open", "2.4"),
    ("open_by_handle_at", "2.6.39"),
    ("openat", "2.6.16"),
    ("pipe", "2.4"),
    ("pipe2", "2.6.27"),
    ("poll", "2.4"),
    ("ppoll", "2.6.16"),
    ("prctl", "2.4"),
    ("pread64", "2.4"),
    ("preadv", "2.6.30"),
    ("prlimit64", "2.6.36"),
    ("pwrite64", "2.4"),
    ("pwritev", "2.6.30"),
    ("read", "2.4"),
    ("readlink", "2.4"),
    ("readlinkat", "2.6.16"),
    ("readv", "2.4"),
    ("recvfrom", "2.4"),
    ("recvmmsg", "2.6.33"),
    ("recvmsg", "2.4"),
    ("rename", "2.4"),
    ("renameat", "2.6.16"),
    ("renameat2", "3.15"),
    ("rmdir", "2.4"),
    ("rt_sigaction", "2.4"),
    ("rt_sigprocmask", "2.4"),
    ("rt_sigreturn", "2.4"),
    ("sched_getaffinity", "2.6.0"),
    ("sched_yield", "2.4"),
    ("sendfile", "2.4"),
    ("sendmmsg", "3.0"),
    ("sendmsg", "2.4"),
    ("sendto", "2.4"),
    ("set_robust_list", "2.6.17"),
    ("set_tid_address", "2.6.0"),
    ("setitimer", "2.4"),
    ("setpgid", "2.4"),
    ("setpriority", "2.4"),
    ("setsid", "2.4"),
    ("setsockopt", "2.4"),
    ("shutdown", "2.4"),
    ("sigaltstack", "2.4"),
    ("socket", "2.4"),
    ("socketpair", "2.4"),
    ("splice", "2.6.17"),
    ("stat", "2.4"),
    ("statfs", "2.4"),
    ("statx", "4.11"),
    ("symlink", "2.4"),
    ("symlinkat", "2.6.16"),
    ("sync_file_range", "2.6.17"),
    ("sysinfo", "2.4"),
    ("tgkill", "2.6.0"),
    ("timerfd_create", "2.6.25"),
    ("truncate", "2.4"),
    ("umask", "2.4"),
    ("uname", "2.4"),
    ("unlink", "2.4"),
    ("unlinkat", "2.6.16"),
    ("utimensat", "2.6.22"),
    ("vfork", "2.4"),
    ("wait4", "2.4"),
    ("waitid", "2.6.9"),
    ("write", "2.4"),
    ("writev", "2.4"),
];

/// Calls the Rust standard library or the `getrandom` crate try first and replace with
/// older ones when the kernel answers ENOSYS, and the agent's inode watch (fanotify),
/// without which it relies on inotify and rescans: they do not raise the oldest kernel.
pub const WITH_FALLBACK: &[&str] = &[
    "getrandom",
    "statx",
    "clone3",
    "copy_file_range",
    "close_range",
    "fanotify_init",
    "fanotify_mark",
    "open_by_handle_at",
];

fn version(v: &str) -> Vec<u32> {
    v.split('.').filter_map(|p| p.parse().ok()).collect()
}

/// The system calls named in an `strace -c` summary.
pub fn from_strace_summary(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.split_whitespace().last())
        .filter(|name| {
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && *name != "total"
                && *name != "syscall"
        })
        .map(str::to_string)
        .collect()
}

/// The oldest kernel the calls need, and the call that needs it (calls with a fallback
/// left out). Fails on a call the table does not know.
pub fn oldest_kernel(calls: &BTreeSet<String>) -> Result<(String, String)> {
    let mut newest = ("2.4".to_string(), String::new());
    let mut unknown = Vec::new();
    for call in calls {
        let Some((_, v)) = INTRODUCED.iter().find(|(n, _)| n == call) else {
            unknown.push(call.clone());
            continue;
        };
        if WITH_FALLBACK.contains(&call.as_str()) {
            continue;
        }
        if version(v) > version(&newest.0) {
            newest = (v.to_string(), call.clone());
        }
    }
    if !unknown.is_empty() {
        bail!("system calls missing from the table: {unknown:?}");
    }
    Ok(newest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_is_read_and_the_newest_call_without_fallback_counts() -> Result<()> {
        let summary = "\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 40.00    0.000004           1         4           epoll_wait
 30.00    0.000003           1         3         1 getrandom
 30.00    0.000003           1         3           accept4
------ ----------- ----------- --------- --------- ----------------
100.00    0.000010           1        10         1 total
";
        let calls = from_strace_summary(summary);
        assert_eq!(calls.len(), 3, "{calls:?}");
        assert_eq!(
            oldest_kernel(&calls)?,
            ("2.6.28".to_string(), "accept4".to_string())
        );
        let mut odd = calls.clone();
        odd.insert("io_uring_setup".into());
        assert!(oldest_kernel(&odd).is_err());
        Ok(())
    }
}
