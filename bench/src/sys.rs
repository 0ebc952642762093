//! Operating-system plumbing: file limits, runtimes, signals, and `/proc` sampling of a
//! proxy's process tree (CPU time and resident memory).

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rustix::process::{Pid, Resource, Signal};

/// Raises this process's soft open-file limit to its hard limit and returns the new value.
///
/// The idle-hold scenario keeps thousands of sockets open in one process.
pub fn raise_nofile_limit() -> u64 {
    let mut limit = rustix::process::getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        // Failure leaves the soft limit as it was; the caller reports what it got.
        let _ = rustix::process::setrlimit(Resource::Nofile, limit);
    }
    rustix::process::getrlimit(Resource::Nofile)
        .current
        .unwrap_or(u64::MAX)
}

/// A tokio runtime with `threads` workers; one thread means a current-thread runtime.
pub fn runtime(threads: usize) -> io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

/// Sends `signal` to process `pid`.
pub fn signal(pid: u32, signal: Signal) -> io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad pid"))?;
    rustix::process::kill_process(pid, signal).map_err(io::Error::from)
}

/// Stops a child: `SIGTERM`, then `SIGKILL` if it has not exited within `grace`.
pub fn stop_child(child: &mut Child, grace: Duration) -> io::Result<()> {
    if child.try_wait()?.is_some() {
        return Ok(());
    }
    signal(child.id(), Signal::TERM)?;
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill()?;
    child.wait().map(drop)
}

/// The first line a command prints on stdout or stderr, or `"unavailable"`.
pub fn version_of(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|out| {
            let text = [out.stdout, out.stderr].concat();
            String::from_utf8_lossy(&text)
                .lines()
                .find(|l| !l.trim().is_empty())
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "unavailable".into())
}

/// The first line a command prints (stdout, then stderr) that contains `needle`, trimmed,
/// or `"unavailable"`.
pub fn line_of(program: &str, args: &[&str], needle: &str) -> String {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|out| {
            let text = [out.stdout, out.stderr].concat();
            String::from_utf8_lossy(&text)
                .lines()
                .find(|l| l.contains(needle))
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "unavailable".into())
}

/// `root` and all its descendants, found by walking `/proc/*/stat` parent links.
pub fn process_tree(root: u32) -> Vec<u32> {
    let mut parents: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            if let Some(ppid) = stat_fields(pid).and_then(|f| f.get(1)?.parse().ok()) {
                parents.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        if let Some(children) = parents.get(&tree[i]) {
            tree.extend(children);
        }
        i += 1;
    }
    tree
}

/// The fields of `/proc/PID/stat` after the command name: index 0 is field 3 (state).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    Some(after_comm.split_whitespace().map(str::to_string).collect())
}

/// User and system CPU time of one process (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> Option<(u64, u64)> {
    let fields = stat_fields(pid)?;
    // Fields 14 (utime) and 15 (stime) of proc(5), counted from field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime, stime))
}

/// Voluntary and involuntary context switches of one process, summed over its threads
/// (`/proc/PID/task/*/status`).
fn context_switches(pid: u32) -> Option<(u64, u64)> {
    let mut sum = (0, 0);
    for task in fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let Ok(status) = fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        for line in status.lines() {
            let count = |v: &str| v.trim().parse::<u64>().unwrap_or(0);
            if let Some(v) = line.strip_prefix("voluntary_ctxt_switches:") {
                sum.0 += count(v);
            } else if let Some(v) = line.strip_prefix("nonvoluntary_ctxt_switches:") {
                sum.1 += count(v);
            }
        }
    }
    Some(sum)
}

/// CPU time and context switches of a process tree at one instant.
#[derive(Debug, Clone)]
pub struct CpuMark {
    /// User and system ticks per process.
    ticks: HashMap<u32, (u64, u64)>,
    /// Voluntary and involuntary context switches per process (all its threads).
    switches: HashMap<u32, (u64, u64)>,
}

impl CpuMark {
    /// Samples every process in the tree under `root`.
    pub fn tree(root: u32) -> CpuMark {
        CpuMark::of(process_tree(root))
    }

    /// Samples one process (all its threads, none of its children).
    pub fn process(pid: u32) -> CpuMark {
        CpuMark::of([pid])
    }

    fn of(pids: impl IntoIterator<Item = u32>) -> CpuMark {
        let pids: Vec<u32> = pids.into_iter().collect();
        let ticks = pids
            .iter()
            .filter_map(|&pid| Some((pid, cpu_ticks(pid)?)))
            .collect();
        let switches = pids
            .iter()
            .filter_map(|&pid| Some((pid, context_switches(pid)?)))
            .collect();
        CpuMark { ticks, switches }
    }

    /// Voluntary (the thread waited, e.g. in `epoll_wait`) and involuntary (it was
    /// preempted) context switches since `earlier`, all threads of all processes.
    pub fn switches_since(&self, earlier: &CpuMark) -> (u64, u64) {
        let (mut voluntary, mut involuntary) = (0, 0);
        for (pid, (v, i)) in &self.switches {
            let (v0, i0) = earlier.switches.get(pid).copied().unwrap_or_default();
            voluntary += v.saturating_sub(v0);
            involuntary += i.saturating_sub(i0);
        }
        (voluntary, involuntary)
    }

    /// CPU seconds (user + system) the processes used since `earlier`; a process that
    /// appeared in between counts from zero, one that vanished is lost (workers do not
    /// come and go mid-run).
    pub fn seconds_since(&self, earlier: &CpuMark) -> f64 {
        let (user, system) = self.split_since(earlier);
        user + system
    }

    /// [`CpuMark::seconds_since`] as user and system seconds.
    pub fn split_since(&self, earlier: &CpuMark) -> (f64, f64) {
        let (mut user, mut system) = (0, 0);
        for (pid, (u, s)) in &self.ticks {
            let (u0, s0) = earlier.ticks.get(pid).copied().unwrap_or_default();
            user += u.saturating_sub(u0);
            system += s.saturating_sub(s0);
        }
        (ticks_to_seconds(user), ticks_to_seconds(system))
    }
}

fn ticks_to_seconds(ticks: u64) -> f64 {
    ticks as f64 / rustix::param::clock_ticks_per_second() as f64
}

/// Machine-wide CPU counters from the first line of `/proc/stat`.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostCpu {
    busy: u64,
    steal: u64,
}

impl HostCpu {
    /// Samples the counters (zeros if `/proc/stat` cannot be read).
    pub fn take() -> HostCpu {
        let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("cpu "))
            .map(|l| {
                l.split_whitespace()
                    .filter_map(|f| f.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let at = |i: usize| fields.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal: busy is all but idle and iowait.
        HostCpu {
            busy: at(0) + at(1) + at(2) + at(5) + at(6),
            steal: at(7),
        }
    }

    /// Busy and stolen CPU seconds, all cores together, since `earlier`.
    pub fn seconds_since(&self, earlier: &HostCpu) -> (f64, f64) {
        (
            ticks_to_seconds(self.busy.saturating_sub(earlier.busy)),
            ticks_to_seconds(self.steal.saturating_sub(earlier.steal)),
        )
    }
}

/// Resident memory of a process tree, summed over its processes, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// Sum of `VmRSS` from `/proc/PID/status`.
    pub rss_kib: u64,
    /// Sum of `Pss` from `/proc/PID/smaps_rollup` (shared pages split between sharers).
    pub pss_kib: u64,
}

impl Memory {
    /// Samples every process in the tree under `root`.
    pub fn take(root: u32) -> Memory {
        process_tree(root)
            .into_iter()
            .fold(Memory::default(), |acc, pid| Memory {
                rss_kib: acc.rss_kib + kib_field(&format!("/proc/{pid}/status"), "VmRSS:"),
                pss_kib: acc.pss_kib + kib_field(&format!("/proc/{pid}/smaps_rollup"), "Pss:"),
            })
    }
}

/// The value of a `Name:   123 kB` line in a `/proc` file, or 0.
fn kib_field(path: &str, name: &str) -> u64 {
    fs::read_to_string(path)
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Records a CPU profile of a process tree with `perf record`, and counts its system
/// calls and context switches with `perf stat`, while it runs.
#[derive(Debug)]
pub struct Profiler {
    record: Child,
    stat: Child,
    stat_output: PathBuf,
}

/// System calls counted one by one in a profiled window: the ones a proxy's hot paths
/// make (event loop, socket I/O, wake-ups, connection set-up, memory).
const TRACED_SYSCALLS: &[&str] = &[
    "epoll_wait",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_ctl",
    "read",
    "write",
    "readv",
    "writev",
    "recvfrom",
    "sendto",
    "recvmsg",
    "sendmsg",
    "splice",
    "futex",
    "sched_yield",
    "accept",
    "accept4",
    "socket",
    "connect",
    "close",
    "shutdown",
    "setsockopt",
    "getsockopt",
    "getsockname",
    "getpeername",
    "fcntl",
    "ioctl",
    "timerfd_settime",
    "mmap",
    "munmap",
    "mprotect",
    "madvise",
    "brk",
];

/// Event counts from `perf stat` over a profiled window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// System calls entered.
    pub syscalls: u64,
    /// Context switches.
    pub context_switches: u64,
    /// Page faults (minor and major).
    pub page_faults: u64,
    /// Entries of the [`TRACED_SYSCALLS`] that were made at least once, by name.
    pub by_syscall: Vec<(String, u64)>,
}

impl Profiler {
    /// Starts sampling the tree under `root` into `output` (`perf record` data) and
    /// `output` + `.stat` (`perf stat` counts).
    pub fn start(root: u32, output: &Path) -> Result<Profiler> {
        let pids = process_tree(root)
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut stat_output = output.as_os_str().to_owned();
        stat_output.push(".stat");
        let stat_output = PathBuf::from(stat_output);
        let perf = |args: &[&str], out: &Path| {
            Command::new("perf")
                .args(args)
                .args(["-p", &pids, "-o"])
                .arg(out)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting perf (run bench/setup.sh)")
        };
        let record = perf(&["record", "-q", "-F", "1999", "-g"], output)?;
        let mut events = String::from("raw_syscalls:sys_enter,context-switches,page-faults");
        for name in TRACED_SYSCALLS {
            events.push_str(",syscalls:sys_enter_");
            events.push_str(name);
        }
        let stat = match perf(&["stat", "-x,", "-e", &events], &stat_output) {
            Ok(stat) => stat,
            Err(e) => {
                let mut record = record;
                let _ = record.kill();
                return Err(e);
            }
        };
        Ok(Profiler {
            record,
            stat,
            stat_output,
        })
    }

    /// Stops both (SIGINT lets perf write its files), waits for them, and returns the counts.
    pub fn stop(mut self) -> Result<Counts> {
        for child in [&mut self.record, &mut self.stat] {
            signal(child.id(), Signal::INT)?;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for child in [&mut self.record, &mut self.stat] {
            while child.try_wait()?.is_none() {
                anyhow::ensure!(Instant::now() < deadline, "perf did not stop");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let text = fs::read_to_string(&self.stat_output).unwrap_or_default();
        // CSV lines: count,unit,event,...
        let count = |event: &str| {
            text.lines()
                .map(|l| l.split(',').collect::<Vec<_>>())
                .find(|f| f.get(2) == Some(&event))
                .and_then(|f| f[0].parse().ok())
                .unwrap_or(0)
        };
        Ok(Counts {
            syscalls: count("raw_syscalls:sys_enter"),
            context_switches: count("context-switches"),
            page_faults: count("page-faults"),
            by_syscall: TRACED_SYSCALLS
                .iter()
                .map(|name| {
                    (
                        name.to_string(),
                        count(&format!("syscalls:sys_enter_{name}")),
                    )
                })
                .filter(|(_, n)| *n > 0)
                .collect(),
        })
    }
}
